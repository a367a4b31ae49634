"""The decoder as a language model (task=lm): truncated BPTT over parallel streams, its resume, sampling through
the caption decoders, strict text reading; and the image-blind captioning baseline (CPU, tiny models)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import compose, requires_java, tiny_overrides

from captioning.config import ConfigError, validate_train_config
from captioning.data.dataset import BadInputError
from captioning.data.text_corpus import TokenStreams, build_corpus, read_text_file, tokenize, unigram_entropy_bits
from captioning.evaluation.text import evaluate_text, generate_text
from captioning.loggers.jsonl import read_jsonl
from captioning.models.decoder import RNNDecoder
from captioning.models.language_model import LanguageModel, load_language_model
from captioning.runtime.checkpoint import load_checkpoint
from captioning.runtime.preemption import PREEMPTION_EXIT_CODE
from captioning.scenes.generator import embedded_text
from captioning.training import language_model as lm
from captioning.training.recipe import train

TEXT = "the cat sat on the mat.\nA dog ran to the red box!\n" * 5  # 245 characters


def tiny_lm(cell: str = "lstm", num_layers: int = 1, vocab_size: int = 12, dropout: float = 0.0) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(RNNDecoder(vocab_size, 8, 12, num_layers=num_layers, cell=cell, dropout=dropout))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def lm_overrides(path, *more) -> list[str]:
    return [
        "task=lm",
        f"data.path={path}",
        "data.batch_size=4",
        "data.tbptt_steps=8",
        "data.eval_batch_size=2",
        "model.decoder.embed_dim=16",
        "model.decoder.hidden_dim=16",
        "trainer.max_steps=10",
        "trainer.val_every_n_steps=5",
        "trainer.log_every_n_steps=1",
        "trainer.progress_bar=false",
        "trainer.device=cpu",
        "trainer.checkpoint_every_minutes=null",
        "task.sample_length=12",
        *more,
    ]


# -- truncated backpropagation through time -------------------------------------------------------------------
@pytest.mark.parametrize("cell,num_layers", [("lstm", 2), ("gru", 1), ("rnn", 1)])
def test_carrying_the_state_over_chunks_equals_one_pass_over_the_stream(cell, num_layers):
    model = tiny_lm(cell, num_layers).eval()
    ids = torch.randint(4, 12, (3, 37))  # 3 streams of 37 tokens
    whole, _, _ = lm.chunk_logits(model, ids, model.zero_state(3, ids.device), 1.0)  # tbptt_steps covers it
    state, pieces = model.zero_state(3, ids.device), []
    for start in range(0, 37, 5):
        logits, _, state = lm.chunk_logits(model, ids[:, start : start + 5], state, 1.0)
        state = model.detach_state(state)
        pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, 1), whole)
    # The evaluation reads streams the same way: its figures do not depend on the chunk length either.
    text = torch.randint(4, 12, (150,))
    covering = evaluate_text(model, text, "char", 3, 150, torch.device("cpu"))
    chunked = evaluate_text(model, text, "char", 3, 7, torch.device("cpu"))
    assert chunked["bpc"] == pytest.approx(covering["bpc"], rel=1e-6)


def test_the_objective_carries_the_state_and_no_gradient_crosses_a_chunk_boundary():
    model = tiny_lm()
    objective = lm.LanguageModelObjective(model, lm.build_schedule_from_config({"name": "teacher_forcing"}))
    x, y, z = 4, 5, 6
    first = {"inputs": torch.tensor([[1] + [x] * 7]), "targets": torch.tensor([[x] * 7 + [y]])}
    second = {"inputs": torch.tensor([[y] + [z] * 7]), "targets": torch.tensor([[z] * 8])}
    objective(first["inputs"], first["targets"])
    assert objective.carry is not None and not any(s.requires_grad for s in objective.carry)
    model.zero_grad()
    loss, _ = objective(second["inputs"], second["targets"])
    loss.backward()
    embedding_grad = dict(model.named_parameters())["decoder.embed.weight"].grad
    # <bos> and x were fed in the first chunk only: the second chunk's loss sends them nothing.
    assert embedding_grad[1].abs().max() == 0 and embedding_grad[x].abs().max() == 0
    assert embedding_grad[y].abs().max() > 0 and embedding_grad[z].abs().max() > 0

    # Not vacuous: with the state handed over undetached, the gradient does reach the first chunk's inputs.
    model.zero_grad()
    _, _, state = lm.chunk_logits(model, first["inputs"], model.zero_state(1, torch.device("cpu")), 1.0)
    logits, _, _ = lm.chunk_logits(model, second["inputs"], state, 1.0)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), second["targets"].flatten()).backward()
    assert dict(model.named_parameters())["decoder.embed.weight"].grad[x].abs().max() > 0


@pytest.mark.parametrize("num_tokens,streams,chunk", [(103, 4, 7), (96, 4, 8), (9, 3, 100)])
def test_the_streams_cover_every_token_once_per_epoch(num_tokens, streams, chunk):
    ids = torch.arange(num_tokens) + 4  # token j of the text is 4 + j
    for ranks in (1, 2):
        if num_tokens < streams * ranks:
            continue
        seen_targets, seen_inputs = [], []
        for rank in range(ranks):
            batches = TokenStreams(ids, streams, chunk, pad_id=0, bos_id=1, rank=rank, num_ranks=ranks)
            for batch in batches.chunks():
                real = batch["targets"] != 0
                seen_targets += batch["targets"][real].tolist()
                seen_inputs += batch["inputs"][real].tolist()
        assert sorted(seen_targets) == ids.tolist()  # every token a target exactly once
        previous = dict(zip(seen_targets, seen_inputs))
        assert all(previous[t] == (1 if t == 4 else t - 1) for t in seen_targets)  # fed the token before it


# -- sampling ------------------------------------------------------------------------------------------------------
def test_sampling_at_temperature_to_zero_equals_greedy_and_beam_of_one():
    corpus = build_corpus(TEXT, _text_cfg(), "TEXT")
    torch.manual_seed(0)
    model = LanguageModel(RNNDecoder(len(corpus.vocab), 8, 16)).eval()
    greedy, _ = generate_text(model, corpus.vocab, "char", "the ", 30, "greedy")
    for seed in range(3):
        cold, _ = generate_text(model, corpus.vocab, "char", "the ", 30, "sample", seed=seed, temperature=1e-4)
        assert cold == greedy
    beam, _ = generate_text(model, corpus.vocab, "char", "the ", 30, "beam", beam_size=1)
    assert beam == greedy and greedy[0].startswith("the ") and len(greedy[0]) == 34
    hot = {
        generate_text(model, corpus.vocab, "char", "the ", 30, "sample", seed=s, temperature=1.5)[0][0]
        for s in range(3)
    }
    assert len(hot) > 1  # not vacuous: a warm sample does vary
    _, unknown = generate_text(model, corpus.vocab, "char", "the ~", 5, "greedy")
    assert unknown == ["~"]


# -- end to end: train, validate, resume, sample -------------------------------------------------------------------
def test_char_run_trains_logs_bpc_and_samples(text_file, tmp_path, monkeypatch):
    seen = []
    original = lm.LanguageModelTask.step
    monkeypatch.setattr(
        lm.LanguageModelTask,
        "step",
        lambda task, run, batch: (seen.append(batch["targets"]), original(task, run, batch)),
    )
    cfg = compose(lm_overrides(text_file, "trainer.max_steps=null", "trainer.max_epochs=1", "model.decoder.cell=gru"))
    summary = train(cfg, tmp_path / "run")
    corpus = build_corpus(TEXT, cfg.data, "TEXT")
    targets = torch.cat([t.flatten() for t in seen])
    assert sorted(targets[targets != 0].tolist()) == sorted(corpus.splits["train"].tolist())  # one epoch: each once
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if "val/bpc" in r] == [5, summary["steps"]]
    assert all(r["train/tokens_per_s"] > 0 for r in records if "train/loss" in r)
    test = summary["test"]
    assert set(test) >= {"test/loss", "test/bpc", "test/bits_per_token"}
    assert test["test/bpc"] == pytest.approx(test["test/loss"] / math.log(2))
    samples = json.loads((tmp_path / "run" / "test_samples.json").read_text())["rows"]
    assert [r[:2] for r in samples] == [["greedy", None], ["sample", 0.5], ["sample", 1.0], ["sample", 1.5]]
    assert all(len(r[2]) == 12 for r in samples)

    from captioning.sample import sample_text

    sample_cfg = compose(
        [f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'best.pt'}", "prompt=the c", "length=6", "temperature=0"],
        config_name="sample",
    )
    rows = sample_text(sample_cfg)
    assert rows[0]["strategy"] == "greedy" and rows[0]["text"].startswith("the c") and len(rows[0]["text"]) == 11


def test_word_run_reports_perplexity(text_file, tmp_path):
    cfg = compose(
        lm_overrides(
            text_file,
            "data.level=word",
            "trainer.monitor=val/perplexity",
            "data.tbptt_steps=4",
            "data.batch_size=2",
            "trainer.max_steps=4",
            "trainer.val_every_n_steps=4",
        )
    )
    summary = train(cfg, tmp_path)
    assert summary["test"]["test/perplexity"] == pytest.approx(math.exp(summary["test"]["test/loss"]))
    model, vocab, _, _ = load_language_model(tmp_path / "checkpoints" / "best.pt", torch.device("cpu"))
    texts, _ = generate_text(model, vocab, "word", "the cat", 5, "beam", beam_size=3, num_samples=2)
    assert len(texts) == 2 and all(t.startswith("the cat") for t in texts)


def _param_vector(path):
    checkpoint = load_checkpoint(path)
    return torch.cat([v.flatten().float() for v in checkpoint["model"].values()])


def _losses(run_dir):
    return {r["step"]: r["train/loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in r}


def test_resume_after_preemption_or_a_kill_equals_a_straight_run(text_file, tmp_path, monkeypatch):
    # 2 layers with dropout, scheduled sampling: random streams everywhere; 4 streams x 8 tokens: 6 chunks per
    # epoch, so the 10 steps cross an epoch boundary (the carried state restarts) after the resume.
    overrides = lm_overrides(
        text_file,
        "model.decoder.num_layers=2",
        "model.decoder.dropout=0.2",
        "schedule=inverse_sigmoid",
        "schedule.k=2",
        "trainer.evaluate_after_training=false",
    )
    straight = train(compose(overrides), tmp_path / "straight")
    assert straight["steps"] == 10

    import os
    import signal

    original = lm.LanguageModelTask.step

    def interrupted(signum=None, crash_at=None):
        def step(task, run, batch):
            if run.progress.step + 1 == crash_at:
                raise RuntimeError("killed")
            if signum and run.progress.step + 1 == 4:
                os.kill(os.getpid(), signum)
            return original(task, run, batch)

        return step

    with monkeypatch.context() as patch:  # a SIGTERM during step 4: saves after it, exits for the requeue
        patch.setattr(lm.LanguageModelTask, "step", interrupted(signum=signal.SIGTERM))
        first = train(compose(overrides), tmp_path / "preempted")
    assert first["preempted"] and first["exit_code"] == PREEMPTION_EXIT_CODE and first["steps"] == 4
    assert load_checkpoint(tmp_path / "preempted" / "checkpoints" / "last.pt")["lm_carry"] is not None
    assert train(compose(overrides), tmp_path / "preempted")["steps"] == 10

    with monkeypatch.context() as patch:  # a crash at step 8: last.pt is from step 7 (checkpoint_every_n_steps)
        patch.setattr(lm.LanguageModelTask, "step", interrupted(crash_at=8))
        with pytest.raises(RuntimeError, match="killed"):
            train(compose(overrides + ["trainer.checkpoint_every_n_steps=7"]), tmp_path / "killed")
    assert load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")["step"] == 7
    train(compose(overrides + ["trainer.checkpoint_every_n_steps=7"]), tmp_path / "killed")

    for run in ("preempted", "killed"):
        assert _losses(tmp_path / run) == _losses(tmp_path / "straight")
        assert torch.equal(
            _param_vector(tmp_path / run / "checkpoints" / "last.pt"),
            _param_vector(tmp_path / "straight" / "checkpoints" / "last.pt"),
        )


# -- inputs ----------------------------------------------------------------------------------------------------------
def _text_cfg(**values):
    from omegaconf import OmegaConf

    return OmegaConf.create({"level": "char", "split": [0.9, 0.05, 0.05], "word_count_threshold": 0, **values})


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "no such file"),
        (b"", "is empty"),
        (b" \n\t\n", "is empty (only whitespace)"),
        (b"hello\x00world" * 10, "looks binary, not text (a NUL byte at offset 5)"),
        (bytes(range(1, 9)) * 20 + b"text", "looks binary, not text (160 control bytes"),
        ("caf\u00e9 cr\u00e8me\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 3"),
        ("hello\n".encode("utf-16"), "is UTF-16 text, not UTF-8"),
    ],
)
def test_bad_text_files_are_named_with_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "input.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises((BadInputError, FileNotFoundError)) as error:
        read_text_file(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_text_inputs_errors_and_config_checks(tmp_path, text_file):
    with pytest.raises(BadInputError, match="is not a file"):
        read_text_file(tmp_path)
    assert read_text_file(_write(tmp_path / "crlf.txt", b"\xef\xbb\xbfa\r\nb\rc")) == "a\nb\nc"  # BOM, line ends
    with pytest.raises(BadInputError, match="too short"):
        build_corpus("abc", _text_cfg(), "short.txt")
    latin = _write(tmp_path / "latin.txt", "d\u00e9j\u00e0 vu\n".encode("latin-1") * 10)
    with pytest.raises(BadInputError, match="latin.txt is not UTF-8"):
        train(compose(lm_overrides(latin)), tmp_path / "run")
    for override, key in [
        ("data.level=byte", "data.level"),
        ("data.tbptt_steps=0", "data.tbptt_steps"),
        ("data.split=[0.9,0.1]", "data.split"),
        ("trainer.monitor=val/CIDEr", "trainer.monitor"),
        (f"data.path={tmp_path / 'missing.txt'}", "data.path"),
        ("objective=self_critical", "objective.name"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate_train_config(compose(lm_overrides(text_file, override)))
    with pytest.raises(ConfigError, match="add task=lm"):  # captioning needs images
        train(compose(["data=text"]), tmp_path / "caption")
    with pytest.raises(ValueError, match="not a language model"):
        torch.save(
            {"model": {}, "vocab": {"itos": []}, "config": {"task": {"name": "caption"}}, "step": 0},
            tmp_path / "caption.pt",
        )
        load_language_model(tmp_path / "caption.pt", torch.device("cpu"))
    from captioning.models.loading import load_model

    torch.save({"model": {}, "vocab": {"itos": []}, "config": {"task": {"name": "lm"}}, "step": 0}, tmp_path / "lm.pt")
    with pytest.raises(ValueError, match="language model's checkpoint.*captioning-sample"):
        load_model(tmp_path / "lm.pt", torch.device("cpu"))  # what captioning-eval and captioning-predict read


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_embedded_text_is_the_synthetic_captions_and_beats_nothing_by_itself():
    text = embedded_text(num_train=20, num_val=2, num_test=2, seed=0)
    lines = text.splitlines()
    assert len(lines) == 24 * 5 and text == embedded_text(num_train=20, num_val=2, num_test=2, seed=0)
    corpus = build_corpus(text, _text_cfg(), "embedded")
    assert 3.5 < unigram_entropy_bits(corpus.splits["train"]) < 5  # ~30 characters, far from uniform
    assert tokenize("a b\n c", "word") == ["a", "b", "\n", "c"]


# -- the image-blind baseline ------------------------------------------------------------------------------------------
def test_the_image_blind_captioner_ignores_its_image():
    from captioning.models.captioner import build_captioner

    small = [
        "model.encoder.name=shufflenet_v2_x0_5",
        "model.encoder.pool=avg",
        "model.decoder.attention=false",
        "model.decoder.embed_dim=16",
        "model.decoder.hidden_dim=16",
    ]
    cfg = compose(["experiment=image_blind", *small])
    torch.manual_seed(0)
    blind = build_captioner(cfg.model, 20).eval()
    assert blind.image_input == "constant" and not any(p.requires_grad for p in blind.encoder.parameters())
    images = torch.randn(2, 3, 32, 32) * torch.tensor([1.0, 5.0])[:, None, None, None]
    tokens = torch.tensor([1, 1])
    log_probs, _ = blind.step(tokens, blind.init_state(images))
    torch.testing.assert_close(log_probs[0], log_probs[1], rtol=0, atol=0)
    other, _ = blind.step(tokens, blind.init_state(torch.zeros(2, 3, 32, 32)))
    torch.testing.assert_close(other, log_probs, rtol=0, atol=0)
    torch.manual_seed(0)
    # batch statistics: O(1) features
    seeing = build_captioner(compose(small).model, 20)
    seen, _ = seeing.step(tokens, seeing.init_state(images))
    assert (seen[0] - seen[1]).abs().max() > 1e-3  # not vacuous: the same model with its image does see it


@requires_java()
@pytest.mark.java
def test_the_image_blind_baseline_trains_and_evaluates_like_the_others(tiny_data_root, tmp_path):
    cfg = compose(tiny_overrides(tiny_data_root) + ["experiment=image_blind", "trainer.max_steps=3"])
    summary = train(cfg, tmp_path)
    test = summary["test"]
    for key in ("test/BLEU-4", "test/ROUGE-L", "test/CIDEr", "test/scene/correct", "test/most_common_caption/CIDEr"):
        assert key in test
    results = json.loads((tmp_path / "results_test_beam.json").read_text())
    assert len(results) == 10 and len({r["caption"] for r in results}) == 1  # one caption for every image
