"""The documentation as a user meets it: the site builds strictly, the results page is what the records give, no
figure lacks its record, and every command in a bash block of README.md and docs/*.md runs or composes.

A page added later is covered without touching this file: the commands are collected from every docs/*.md."""

from __future__ import annotations

import importlib.util
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]
RESULTS_PAGE = DOCS / "results.md"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# -- the site ---------------------------------------------------------------------------------------------------------
def test_the_site_builds_strictly(tmp_path):
    """mkdocs.yml is strict: a broken link or anchor, a missing page or a page left out of the nav fails it."""
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for page in DOCS.glob("*.md"):
        assert (tmp_path / "site" / page.with_suffix(".html").name).is_file(), page.name
    # the README is not part of the site: its links into docs/ are checked against the built pages
    for target, anchor in re.findall(r"\]\(docs/([\w.-]+\.md)(?:#([\w-]+))?\)", (REPO / "README.md").read_text()):
        html = tmp_path / "site" / target.replace(".md", ".html")
        assert html.is_file(), f"README links to docs/{target}, which is not a page"
        assert not anchor or f'id="{anchor}"' in html.read_text(), f"README: docs/{target}#{anchor} has no anchor"


def test_a_broken_link_fails_the_build(tmp_path):
    docs = tmp_path / "docs"
    shutil.copytree(DOCS, docs)
    (docs / "index.md").write_text((docs / "index.md").read_text() + "\n[gone](no-such-page.md)\n")
    config = tmp_path / "mkdocs.yml"
    config.write_text((REPO / "mkdocs.yml").read_text())
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(tmp_path / "site")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "no-such-page.md" in done.stdout + done.stderr


# -- results with one source ------------------------------------------------------------------------------------------
def test_the_results_page_is_what_the_records_give():
    results_page = load_tool("results_page")
    assert RESULTS_PAGE.read_text() == results_page.render(), "run: python tools/results_page.py"


def test_every_record_belongs_to_an_entry_and_every_entry_has_its_record():
    results_page = load_tool("results_page")
    on_disk = {
        str(p.relative_to(results_page.RESULTS))
        for p in results_page.RESULTS.rglob("*")
        if p.is_file() and p.name != "index.yaml"
    }
    listed = results_page.listed_files()
    assert on_disk - listed == set(), "records that no entry of tools/results/index.yaml names"
    assert listed - on_disk == set(), "entries whose record is missing"


def test_records_kept_in_git_history_are_there():
    results_page = load_tool("results_page")
    refs = [ref for e in yaml_entries(results_page) for ref in e.get("records_in_git", [])]
    assert refs
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for ref in refs:
        found = subprocess.run(["git", "cat-file", "-e", ref], cwd=REPO, capture_output=True)
        if found.returncode and b"Not a valid object name" in found.stderr and (REPO / ".git" / "shallow").exists():
            pytest.skip("a shallow clone lacks the history")
        assert found.returncode == 0, f"{ref}: not in git history"


def yaml_entries(results_page) -> list[dict]:
    import yaml

    return yaml.safe_load(results_page.INDEX.read_text())["entries"]


def test_the_page_follows_a_changed_record(tmp_path, monkeypatch):
    """Not a snapshot: change one figure in a record and the generated page shows the new one."""
    results_page = load_tool("results_page")
    copy = tmp_path / "results"
    shutil.copytree(results_page.RESULTS, copy)
    record = copy / "benchmark_jobs_cpu_2cores.json"
    record.write_text(record.read_text().replace('"test/CIDEr": 2.2635', '"test/CIDEr": 1.2346', 1))
    monkeypatch.setattr(results_page, "RESULTS", copy)
    page = results_page.render(copy / "index.yaml")
    assert "| model (best checkpoint) | 0.561 | 0.386 | 1.235 | 0.944 |" in page
    assert page != RESULTS_PAGE.read_text()


def test_an_entry_without_its_commit_or_a_superseded_one_without_its_successor_is_refused(tmp_path, monkeypatch):
    results_page = load_tool("results_page")
    index = tmp_path / "index.yaml"
    index.write_text(
        "entries:\n  - {id: a, title: A, status: superseded, date: '2026-01-01', commit: x, machine: m,"
        " command: c, record: fault_campaign.json}\n"
    )
    with pytest.raises(results_page.RecordError, match="superseded_by"):
        results_page.render(index)
    index.write_text(
        "entries:\n  - {id: a, title: A, status: current, date: '2026-01-01', machine: m, command: c,"
        " record: fault_campaign.json}\n"
    )
    with pytest.raises(results_page.RecordError, match="commit is required"):
        results_page.render(index)


FIGURE = re.compile(r"(?<![\w.])\d+\.\d{3}(?![\w.])")


def test_every_figure_of_three_decimals_in_the_docs_is_on_the_results_page():
    """Measured figures are written with three decimals; outside the generated page each must be one of its."""
    on_results = set(FIGURE.findall(RESULTS_PAGE.read_text()))
    for page in PAGES:
        if page == RESULTS_PAGE:
            continue
        missing = sorted(set(FIGURE.findall(page.read_text())) - on_results)
        assert not missing, f"{page.name}: figures with no record on docs/results.md: {missing}"


def test_the_stale_figures_are_gone():
    text = "\n".join(p.read_text() for p in PAGES if p != RESULTS_PAGE)
    assert "0.772" not in text and "5000" not in text and "5,000 puts" not in text
    assert not re.search(r"fa74c21(?!-dirty)", text)
    superseded = RESULTS_PAGE.read_text().split("## Superseded", 1)[1]
    assert "0.772" in superseded and "0.168" in superseded  # kept, as superseded


# -- the complete table of config groups ------------------------------------------------------------------------------
@pytest.mark.parametrize("page", ["README.md", "docs/configuration.md"])
def test_the_groups_table_lists_every_group_and_option(page):
    text = (REPO / page).read_text()
    rows = dict(re.findall(r"^\| `([\w/]+)` \| (.*) \|$", text, flags=re.M))
    conf = REPO / "conf"
    groups = {d.name: d for d in conf.iterdir() if d.is_dir() and d.name != "hydra"}
    groups.update({f"hydra/{d.name}": d for d in (conf / "hydra").iterdir() if d.is_dir()})
    for group, folder in sorted(groups.items()):
        assert group in rows, f"{page}: no row for the config group {group}"
        options = {f.name.split(".")[0] for f in folder.iterdir() if f.name.endswith((".yaml", ".yaml.example"))}
        missing = sorted(o for o in options if f"`{o}`" not in rows[group])
        assert not missing, f"{page}: group {group} misses options {missing}"


# -- one rule for inverse_sigmoid_k -----------------------------------------------------------------------------------
def test_the_inverse_sigmoid_k_table_is_what_the_configs_compose():
    from conftest import compose

    text = (DOCS / "scheduled-sampling.md").read_text()
    rows = {
        cells[0]: cells
        for cells in (
            [c.strip() for c in line.strip("|").split("|")]
            for line in text.splitlines()
            if line.startswith("| ") and "inverse_sigmoid_k" not in line
        )
    }
    for overrides, name, steps in (
        ([], "the synthetic default", lambda c: c.trainer.max_steps),
        (["preset=coco"], "COCO", lambda c: 113_287 // c.data.batch_size * c.trainer.max_epochs),
    ):
        row = next(cells for key, cells in rows.items() if key.startswith(name))
        cfg = compose(overrides + ["experiment=scheduled_sampling"])
        k = cfg.inverse_sigmoid_k
        assert cfg.schedule.k == k
        assert float(row[1]) == k, (name, row[1], k)
        assert int(row[3].replace(",", "")) == round(k * math.log(k)), (name, row[3])
        assert int(row[4].replace(",", "")) == steps(cfg), (name, row[4])
    assert text.count("## The schedule's length") == 1
    for page in PAGES:  # stated once: elsewhere only links to it
        if page.name != "scheduled-sampling.md":
            assert not re.search(r"inverse_sigmoid_k\s*[=:]\s*\d", page.read_text()), page.name


# -- every documented command -----------------------------------------------------------------------------------------
# Commands that cannot run or compose here, each with its reason. Matched on the command's first word(s).
EXCEPTIONS = {
    "pip install": "installs packages from the network; the extras it names are checked against pyproject.toml",
    "python -m pytest": "the test suite itself",
    "mkdocs build": "run by test_the_site_builds_strictly",
    "docker": "needs a Docker engine; tests/test_docker.py lints the Dockerfile (a captioning-train in it is composed)",
    "apptainer": "needs Apptainer and a built image (a captioning-train inside is composed)",
    "srun": "needs a SLURM cluster (a captioning-train inside is composed)",
    "mkdir": "creates the folders a container run binds",
}
# Commands cheap enough to run for real, verbatim (with these arguments added so that they write nothing).
RUN_FOR_REAL = {"python tools/results_page.py": ["--check"]}
ENTRY_POINTS = {
    "captioning-train": "config",
    "captioning.train": "config",
    "captioning-eval": "eval",
    "captioning-predict": "predict",
    "captioning-sample": "sample",
}


def bash_commands(page: Path) -> list[tuple[str, str]]:
    """(where, command) for every command of every ```bash block: continuations joined, `&&` and `;` split."""
    found, inside = [], False
    lines = page.read_text().replace("\\\n", " ").splitlines()
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            inside = line.strip() == "```bash"
            continue
        words = shlex.split(line, comments=True) if inside else []
        command: list[str] = []
        for word in words + ["&&"]:
            if word in ("&&", ";"):
                if command:
                    found.append((f"{page.name}:{number}", shlex.join(command)))
                command = []
            else:
                command.append(word)
    return found


ALL_COMMANDS = list(
    {command: (where, command) for page in reversed(PAGES) for where, command in reversed(bash_commands(page))}.values()
)[::-1]  # each command once


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Runs of a -m sweep that between them use every value of every a,b,c list (not inside [...]) at least once:
    run i takes value i of each list (the last one when a list is shorter). tests/test_presets.py composes the
    full product of the COCO sweeps."""
    choices = [
        [
            (w.partition("=")[0], v)
            for v in ([w.partition("=")[2]] if w.partition("=")[2].startswith("[") else w.partition("=")[2].split(","))
        ]
        for w in overrides
    ]
    width = max((len(c) for c in choices), default=1)
    return [[f"{key}={value}" for key, value in (c[min(i, len(c) - 1)] for c in choices)] for i in range(width)]


def copy_conf_without_local_settings(target: Path) -> None:
    """conf/ as a fresh clone has it: this machine's own conf/local/default.yaml, if any, left out."""
    shutil.copytree(REPO / "conf", target)
    (target / "local" / "default.yaml").unlink(missing_ok=True)


@pytest.fixture(scope="module")
def conf_with_local(tmp_path_factory) -> Path:
    """conf/ with the example local settings in place, as the docs assume (docs/cluster.md)."""
    conf = tmp_path_factory.mktemp("conf") / "conf"
    copy_conf_without_local_settings(conf)
    shutil.copy(REPO / "conf" / "local" / "default.yaml.example", conf / "local" / "default.yaml")
    return conf


def compose_in(conf: Path, config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(conf), version_base="1.3"):
        return compose(config_name, overrides=overrides, return_hydra_config=True)


def with_real_paths(overrides: list[str], tmp_path: Path) -> list[str]:
    """Placeholder paths that the config checks open replaced by real ones (a checkpoint file, a text, a folder)."""
    text = tmp_path / "text.txt"
    text.write_text("a red circle above a blue square\n" * 50)
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"")
    out = []
    for word in overrides:
        key = word.split("=", 1)[0]
        if key == "objective.init_from":
            word = f"{key}={checkpoint}"
        elif key == "data.path":
            word = f"{key}={text}"
        elif key == "data.features":
            word = f"{key}={tmp_path}"
        out.append(word)
    return out


def check_entry_point(words: list[str], conf: Path, tmp_path: Path) -> None:
    from captioning.config import validate_train_config

    start = next(i for i, w in enumerate(words) if w.split("/")[-1] in ENTRY_POINTS)
    config_name = ENTRY_POINTS[words[start].split("/")[-1]]
    overrides = [w for w in words[start + 1 :] if "=" in w]
    leftovers = [w for w in words[start + 1 :] if "=" not in w and w not in ("-m", "--multirun", "--cfg", "job")]
    assert not leftovers, f"arguments that are not overrides: {leftovers}"
    for run in expand_sweep(overrides):
        cfg = compose_in(conf, config_name, with_real_paths(run, tmp_path))
        OmegaConf.resolve(cfg.hydra.launcher)  # the launcher's values resolve (partition from local settings)
        if config_name == "config":
            validate_train_config(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))


def check_argparse_tool(words: list[str], conf: Path) -> None:
    """A tools/ script, a `python -m` module of the package or of tools/, or captioning-score: it exists and knows
    every --option used; Hydra overrides compose."""
    if words[0] == "captioning-score":
        source, args = REPO / "captioning" / "score.py", words[1:]
    elif words[:2] == ["python", "-m"]:  # a module of the package or of tools/ (python -m captioning.runtime.x)
        assert words[2].split(".")[0] in ("captioning", "tools"), f"not a documented kind of command: {words}"
        source, args = REPO.joinpath(*words[2].split(".")), words[3:]
        source = source if source.is_dir() else source.with_suffix(".py")
    else:
        assert words[0] == "python" and words[1].startswith("tools/"), f"not a documented kind of command: {words}"
        source, args = REPO / words[1], words[2:]
    if source.is_dir():  # a tool package run by its folder (tools/fault_campaign): its __main__ and modules
        assert (source / "__main__.py").is_file(), source
        text = "\n".join(path.read_text() for path in sorted(source.glob("*.py")))
    else:
        assert source.is_file(), source
        text = source.read_text()
    for option in (a.split("=")[0] for a in args if a.startswith("--") and a != "--"):
        assert f'"{option}"' in text, f"{source.name} has no option {option}"
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    if overrides:
        compose_in(conf, "config", overrides)


@pytest.mark.parametrize("where,command", ALL_COMMANDS, ids=[w for w, _ in ALL_COMMANDS])
def test_every_documented_command_runs_or_composes(where, command, conf_with_local, tmp_path):
    words = shlex.split(command)
    if any(w.split("/")[-1] in ENTRY_POINTS for w in words):
        check_entry_point(words, conf_with_local, tmp_path)
        return
    if words[:2] == ["pip", "install"]:
        tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
        extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        for spec in words[2:]:
            for extra in re.findall(r"\[([\w,]+)\]", spec):
                assert set(extra.split(",")) <= set(extras), (spec, sorted(extras))
        return
    if words[0] == "cp":
        assert (REPO / words[1]).is_file(), words[1]
        return
    if any(command.startswith(prefix) for prefix in EXCEPTIONS):
        return
    check_argparse_tool(words, conf_with_local)
    if command in RUN_FOR_REAL:
        done = subprocess.run(
            [sys.executable, *words[1:], *RUN_FOR_REAL[command]], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_commands_are_found():
    """The scan sees the README's quick start and the COCO sweep, and every page's commands."""
    commands = [c for _, c in ALL_COMMANDS]
    assert "captioning-train" in commands and "python -m pytest" in commands
    assert any(c.startswith("captioning-train -m hydra/launcher=slurm preset=coco") for c in commands)
    assert {w.split(":")[0] for w, _ in ALL_COMMANDS} >= {"README.md", "coco.md", "cluster.md", "decoding.md"}
    unused = [prefix for prefix in EXCEPTIONS if not any(c.startswith(prefix) for c in commands)]
    assert not unused, f"exceptions no documented command needs any more: {unused}"


def test_the_quick_start_keeps_its_two_commands(tmp_path):
    quick = (REPO / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    (tmp_path / "quick.md").write_text(quick)
    assert [c for _, c in bash_commands(tmp_path / "quick.md")] == [
        "pip install -e .",
        "captioning-train",
        "pip install -e '.[test]'",
        "python -m pytest",
    ]


# -- per-machine settings ---------------------------------------------------------------------------------------------
def test_a_run_composes_with_and_without_local_settings(conf_with_local, tmp_path):
    from captioning.config import ConfigError, validate_train_config

    bare = tmp_path / "conf"
    copy_conf_without_local_settings(bare)
    without = compose_in(bare, "config", ["preset=coco", "hydra/launcher=slurm", "logger=wandb"])
    assert without.data.root is None and without.hydra.launcher.partition is None
    assert without.logger.wandb.entity is None
    with pytest.raises(ConfigError, match=r"data\.root"):
        validate_train_config(OmegaConf.masked_copy(without, [k for k in without if k != "hydra"]))
    assert "local" not in compose_in(bare, "config", [])

    local = OmegaConf.load(conf_with_local / "local" / "default.yaml")
    cfg = compose_in(conf_with_local, "config", ["preset=coco", "hydra/launcher=slurm", "logger=wandb"])
    assert cfg.data.root == local.coco_root and cfg.hydra.launcher.partition == local.slurm.partition
    assert cfg.logger.wandb.entity == local.wandb_entity
    validate_train_config(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    overridden = compose_in(
        conf_with_local,
        "config",
        ["preset=coco", "data.root=/elsewhere", "hydra/launcher=slurm", "hydra.launcher.partition=long"],
    )
    assert overridden.data.root == "/elsewhere" and overridden.hydra.launcher.partition == "long"


def test_local_settings_are_git_ignored_but_the_example_is_not():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "conf/local/default.yaml"], cwd=REPO).returncode
    example = subprocess.run(["git", "check-ignore", "-q", "conf/local/default.yaml.example"], cwd=REPO).returncode
    assert ignored == 0 and example == 1
