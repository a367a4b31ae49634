"""Exposure-bias probe: teacher-forced vs free-running NLL/accuracy of the reference words, per position."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from captioning.data.build import reference_loader
from captioning.metrics.reference_likelihood import (
    SUMMARY_KEYS,
    ReferenceLikelihoodReport,
    probe_captions,
    reference_likelihood_probe,
)
from captioning.models.captioner import Captioner
from captioning.models.decoder import RNNDecoder
from captioning.models.encoder import PrecomputedFeatures
from captioning.training.objectives import shift_right

V, FEAT, MAX_LEN = 20, 8, 7
PER_POSITION_KEYS = {"position", "tokens", "nll_tf", "nll_free", "nll_gap", "acc_tf", "acc_free", "acc_gap"}


def tiny_model(dropout: float = 0.0, seed: int = 0) -> Captioner:
    torch.manual_seed(seed)
    return Captioner(PrecomputedFeatures(FEAT), RNNDecoder(V, 16, 24, num_layers=2, dropout=dropout))


def random_batch(b: int, c: int, seed: int) -> dict:
    """Captions of random lengths 1..MAX_LEN words, then <eos>, then <pad>; trimmed like collate."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.zeros(b, c, MAX_LEN + 1, dtype=torch.long)
    for i in range(b):
        for j in range(c):
            n = int(torch.randint(1, MAX_LEN + 1, (1,), generator=g))
            targets[i, j, :n] = torch.randint(4, V, (n,), generator=g)
            targets[i, j, n] = 2
    longest = int((targets != 0).sum(-1).max())
    return {"images": torch.randn(b, FEAT, generator=g), "targets": targets[..., :longest].contiguous()}


def caption_oracle(model, feature: torch.Tensor, caption: list[int]) -> dict[str, list]:
    """One caption at a time, in plain Python: feed the reference (tf) or the own argmax (free)."""
    out = {}
    with torch.no_grad():
        for mode in ("tf", "free"):
            state = model.init_state(feature[None])
            token = torch.tensor([model.bos_id])
            nll, correct = [], []
            for word in caption:
                log_probs, state = model.step(token, state)
                nll.append(-float(log_probs[0, word]))
                correct.append(int(log_probs[0].argmax()) == word)
                token = torch.tensor([word]) if mode == "tf" else log_probs.argmax(-1)
            out[f"nll_{mode}"], out[f"correct_{mode}"] = nll, correct
    return out


def words_of(row: torch.Tensor) -> list[int]:
    return [int(w) for w in row if int(w) != 0]


def test_teacher_forced_equals_cross_entropy_of_fused_forward():
    model = tiny_model(dropout=0.3).train()  # the probe must switch dropout off and switch back
    batches = [random_batch(3, 4, seed=1), random_batch(2, 5, seed=2)]
    report = reference_likelihood_probe(model, batches, "cpu", MAX_LEN)
    assert model.training

    model.eval()
    losses, hits, targets_all = [], [], []
    with torch.no_grad():
        for batch in batches:
            c = batch["targets"].shape[1]
            targets = batch["targets"].flatten(0, 1)  # (N, L)
            features = model.encode(batch["images"]).repeat_interleave(c, dim=0)  # (N, F)
            logits = model.forward_teacher_forcing(features, shift_right(targets, model.bos_id))  # (N, L, V)
            losses.append(F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=0, reduction="none"))
            hits.append((logits.argmax(-1) == targets).float())
            targets_all.append(targets)
    mask = [t != 0 for t in targets_all]
    tokens = sum(int(m.sum()) for m in mask)
    expected_nll = sum(float(loss[m].sum()) for loss, m in zip(losses, mask)) / tokens
    expected_acc = sum(float(h[m].sum()) for h, m in zip(hits, mask)) / tokens
    summary = report.summary()
    assert summary["reference_likelihood/nll_tf"] == pytest.approx(expected_nll, rel=1e-5)
    assert summary["reference_likelihood/acc_tf"] == pytest.approx(expected_acc, abs=1e-9)
    for t, (nll_t, n_t) in enumerate(zip(report.per_position["nll_tf"], report.per_position["tokens"])):
        at_t = [loss[:, t][m[:, t]] for loss, m in zip(losses, mask) if loss.shape[1] > t]
        assert n_t == sum(len(x) for x in at_t)
        assert nll_t == pytest.approx(float(torch.cat(at_t).sum()) / n_t, rel=1e-5)
    assert report.captions == 3 * 4 + 2 * 5 and report.images == 5


def test_position_one_identical_and_both_modes_match_a_per_caption_loop():
    model = tiny_model()
    batch = random_batch(3, 3, seed=3)
    b, c, length = batch["targets"].shape
    captions = batch["targets"].flatten(0, 1)
    out = probe_captions(model.eval(), batch["images"], captions, torch.arange(b).repeat_interleave(c))
    assert torch.equal(out["nll_tf"][:, 0], out["nll_free"][:, 0])
    assert torch.equal(out["correct_tf"][:, 0], out["correct_free"][:, 0])
    assert torch.equal(out["mask"], captions != 0)
    differs = 0
    for n in range(b * c):
        words = words_of(captions[n])
        oracle = caption_oracle(model, batch["images"][n // c], words)
        k = len(words)
        for mode in ("tf", "free"):
            torch.testing.assert_close(out[f"nll_{mode}"][n, :k], torch.tensor(oracle[f"nll_{mode}"]))
            assert out[f"correct_{mode}"][n, :k].tolist() == oracle[f"correct_{mode}"]
        differs += not torch.allclose(out["nll_tf"][n, 1:k], out["nll_free"][n, 1:k])
    assert differs > 0  # random references: the greedy prefix departs from them, so the modes must differ
    report = reference_likelihood_probe(model, [batch], "cpu", MAX_LEN)
    p = report.per_position
    assert p["nll_tf"][0] == p["nll_free"][0] and p["acc_tf"][0] == p["acc_free"][0]
    assert p["nll_gap"][0] == 0.0 and p["acc_gap"][0] == 0.0


def trained_two_reference_model():
    """Each image has two references with disjoint words: the model learns both (first word ~50/50), so
    greedy follows one of them exactly and the other's words come after a wrong prefix."""
    refs = {0: [[4, 5, 6, 2], [7, 8, 9, 10, 2]], 1: [[11, 12, 2], [13, 14, 15, 2]]}
    targets = torch.zeros(2, 2, 6, dtype=torch.long)
    for i, pair in refs.items():
        for j, words in enumerate(pair):
            targets[i, j, : len(words)] = torch.tensor(words)
    torch.manual_seed(0)
    features = torch.randn(2, FEAT)
    model = tiny_model(seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    flat = targets.flatten(0, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is several times faster on a busy machine
    try:
        for _ in range(150):
            logits = model.forward_teacher_forcing(features.repeat_interleave(2, 0), shift_right(flat, model.bos_id))
            loss = F.cross_entropy(logits.transpose(1, 2), flat, ignore_index=0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model, {"images": features, "targets": targets}


def test_greedy_reference_has_no_gap_and_wrong_prefix_raises_nll():
    model, batch = trained_two_reference_model()
    captions = batch["targets"].flatten(0, 1)
    out = probe_captions(model.eval(), batch["images"], captions, torch.arange(2).repeat_interleave(2))
    followed = []
    for n in range(4):
        words = words_of(captions[n])
        k = len(words)
        oracle = caption_oracle(model, batch["images"][n // 2], words)
        torch.testing.assert_close(out["nll_free"][n, :k], torch.tensor(oracle["nll_free"]))
        assert all(oracle["correct_tf"][1:])  # memorised under teacher forcing (position 1: a coin flip)
        if out["free_tokens"][n, :k].tolist() == words:  # greedy reproduces this reference
            followed.append(n)
            torch.testing.assert_close(out["nll_free"][n, :k], out["nll_tf"][n, :k])
            assert out["correct_free"][n, :k].all()
        else:  # greedy took the other reference: from position 2 on the prefix is wrong, and its words
            # (not its <eos>, which the model may also put after its own caption) become unlikely
            assert (out["nll_free"][n, 1 : k - 1] > out["nll_tf"][n, 1 : k - 1] + 1.0).all()
            assert not out["correct_free"][n, 1 : k - 1].any()
    assert sorted(n // 2 for n in followed) == [0, 1]  # exactly one followed reference per image

    report = reference_likelihood_probe(model, [batch], "cpu", MAX_LEN)
    summary = report.summary()
    mask = captions != 0
    assert (
        summary["reference_likelihood/acc_tf"] == 14 / 16
    )  # 16 tokens; at position 1 one reference per image is missed
    assert summary["reference_likelihood/acc_free"] == pytest.approx(float(out["correct_free"][mask].float().mean()))
    expected_free = float(out["nll_free"][mask].sum()) / int(mask.sum())
    assert summary["reference_likelihood/nll_free"] == pytest.approx(expected_free, rel=1e-5)
    assert summary["reference_likelihood/nll_gap"] > 1.0 and summary["reference_likelihood/acc_gap"] > 0.25
    # Position 1 is a coin flip in both modes; from 2 on tf is perfect, free only on the followed references.
    p = report.per_position
    assert p["acc_tf"][0] == p["acc_free"][0] == 0.5
    assert p["acc_tf"][1:] == [1.0] * (len(p["acc_tf"]) - 1)
    assert p["acc_free"][1] == 0.5


def test_padding_positions_and_rows_are_ignored():
    model = tiny_model()
    batch = random_batch(2, 3, seed=4)
    report = reference_likelihood_probe(model, [batch], "cpu", MAX_LEN + 3)
    b, c, length = batch["targets"].shape
    padded = torch.zeros(b, c + 1, length + 3, dtype=torch.long)  # an all-padding caption, extra pad columns
    padded[:, :c, :length] = batch["targets"]
    report_padded = reference_likelihood_probe(
        model, [{"images": batch["images"], "targets": padded}], "cpu", MAX_LEN + 3
    )
    assert report_padded.per_position["tokens"] == report.per_position["tokens"]
    assert report_padded.captions == report.captions == b * c
    for key in PER_POSITION_KEYS - {"position", "tokens"}:
        assert report_padded.per_position[key] == pytest.approx(report.per_position[key], rel=1e-6, abs=1e-9)
    expected_tokens = (batch["targets"] != 0).sum((0, 1)).tolist()  # (L,)
    assert report.per_position["tokens"] == expected_tokens
    assert report.per_position["position"] == list(range(1, length + 1))


def test_report_keys_json_plot_and_mode(tmp_path):
    model = tiny_model().eval()
    report = reference_likelihood_probe(
        model, [random_batch(2, 2, seed=5), {"size": 0, "bad_images": []}], "cpu", MAX_LEN
    )
    assert not model.training  # eval stays eval
    summary = report.summary()
    assert (
        set(summary)
        == set(SUMMARY_KEYS)
        == {f"reference_likelihood/{m}_{k}" for m in ("nll", "acc") for k in ("tf", "free", "gap")}
    )
    assert all(math.isfinite(v) for v in summary.values())
    assert summary["reference_likelihood/nll_gap"] == pytest.approx(
        summary["reference_likelihood/nll_free"] - summary["reference_likelihood/nll_tf"]
    )
    assert summary["reference_likelihood/acc_gap"] == pytest.approx(
        summary["reference_likelihood/acc_tf"] - summary["reference_likelihood/acc_free"]
    )
    assert set(report.per_position) == PER_POSITION_KEYS
    assert len({len(v) for v in report.per_position.values()}) == 1
    data = json.loads(json.dumps(report.to_json()))
    assert data["summary"] == pytest.approx(summary) and data["tokens"] == sum(report.per_position["tokens"])
    restored = ReferenceLikelihoodReport(data["per_position"], data["images"], data["captions"])
    assert restored.summary() == pytest.approx(summary)

    path = report.plot(tmp_path / "plots" / "reference_likelihood.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(path).shape
    assert width > height > 100


def test_clear_errors_and_mode_restored_after_one():
    model = tiny_model().train()
    batch = random_batch(2, 2, seed=6)
    with pytest.raises(ValueError, match="max_len"):
        reference_likelihood_probe(model, [batch], "cpu", max_len=batch["targets"].shape[2] - 2)
    assert model.training
    with pytest.raises(ValueError, match=r"\(B, C, L\)"):
        reference_likelihood_probe(
            model, [{"images": batch["images"], "targets": batch["targets"][:, 0]}], "cpu", MAX_LEN
        )
    with pytest.raises(ValueError, match="'targets'"):
        reference_likelihood_probe(model, [{"images": batch["images"]}], "cpu", MAX_LEN)
    with pytest.raises(ValueError, match="no reference token"):
        reference_likelihood_probe(model, [], "cpu", MAX_LEN)


def test_reference_loader_yields_every_reference_once(tmp_path):
    from omegaconf import OmegaConf
    from PIL import Image

    from captioning.data.coco import ImageRecord
    from captioning.data.text import training_tokens
    from captioning.data.vocab import Vocabulary

    captions = {
        1: ["a red cube", "the red cube on grass", "zzz qqq"],  # the last: only unknown words
        2: ["a blue ball", "a ball"],
    }
    records = []
    for image_id, caps in captions.items():
        path = tmp_path / f"{image_id}.png"
        Image.new("RGB", (40, 36), (image_id * 60, 20, 90)).save(path)
        records.append(ImageRecord(image_id, path, "val", caps))
    vocab = Vocabulary.build([training_tokens(c) for caps in captions.values() for c in caps[:2]], 0)
    cfg = OmegaConf.create(
        {
            "max_len": 4,
            "image_size": 32,
            "resize_size": None,
            "max_image_pixels": 10**6,
            "eval_batch_size": 8,
            "num_workers": 0,
        }
    )
    batches = list(reference_loader(records, vocab, cfg))
    assert len(batches) == 1
    targets = batches[0]["targets"]  # (2 images, 2 captions each after skipping "zzz qqq", 5)
    assert targets.shape == (2, 2, 5) and batches[0]["images"].shape == (2, 3, 32, 32)
    got = sorted(vocab.decode(row.tolist()) for row in targets.flatten(0, 1))
    assert got == sorted(["a red cube", "the red cube on", "a blue ball", "a ball"])  # truncated to max_len
    model = Captioner(PrecomputedFeatures(FEAT), RNNDecoder(len(vocab), 8, 8))
    model.encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(FEAT))  # images -> (B, F)
    report = reference_likelihood_probe(model, batches, "cpu", cfg.max_len)
    assert report.captions == 4 and report.images == 2
    assert report.per_position["tokens"] == [4, 4, 4, 3, 1]
