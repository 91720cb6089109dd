"""Shared fixtures: the pipewright binary, a training corpus, manifests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]

# A plain-text corpus that the fortunes package installs (the project's
# scripts install it with apt); using it keeps third-party text out of the
# repository.
FORTUNES_DIR = Path("/usr/share/games/fortunes")


def skip_or_fail(reason: str) -> None:
    """Skip when run by hand; fail in the full suite (PIPEWRIGHT_REQUIRE_ALL=1,
    set by scripts/test.sh), where a missing prerequisite is a broken setup."""
    if os.environ.get("PIPEWRIGHT_REQUIRE_ALL") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pipewright_bin() -> Path:
    """The built `pipewright` binary.

    PIPEWRIGHT_BIN names it explicitly, and then it must exist. Otherwise the
    release build in target/ is used, and the tests that need it are skipped
    with instructions when it has not been built.
    """
    explicit = os.environ.get("PIPEWRIGHT_BIN")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            pytest.fail(f"PIPEWRIGHT_BIN={explicit} does not exist")
        return path.resolve()
    path = REPO_ROOT / "target" / "release" / "pipewright"
    if not path.is_file():
        skip_or_fail(
            f"{path} not built: run `cargo build --release -p pipewright` "
            "or set PIPEWRIGHT_BIN"
        )
    return path


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of UTF-8 text files to train on, copied from fortunes.

    The fortunes directory also holds binary index files (*.dat) and
    symlinked duplicates (*.u8); only the regular text files are copied.
    """
    if not FORTUNES_DIR.is_dir():
        skip_or_fail(
            f"{FORTUNES_DIR} is missing: install the corpus with "
            "`apt-get install -y fortunes`"
        )
    out = tmp_path_factory.mktemp("corpus")
    copied = 0
    for src in sorted(FORTUNES_DIR.iterdir()):
        if src.is_symlink() or not src.is_file() or src.suffix in {".dat", ".u8"}:
            continue
        text = src.read_bytes().decode("utf-8", errors="replace")
        (out / f"{src.name}.txt").write_text(text, encoding="utf-8")
        copied += 1
    if copied == 0:
        skip_or_fail(f"{FORTUNES_DIR} holds no text files")
    return out


def write_manifest(
    path: Path,
    *,
    name: str,
    corpus: Path,
    tied: bool,
    stages: int,
    tokenizer: dict | None = None,
    steps: int = 5,
) -> Path:
    """Write a TrainingRun manifest for a tiny Llama model to `path`."""
    manifest = {
        "apiVersion": "pipewright.dev/v1alpha1",
        "kind": "TrainingRun",
        "metadata": {"name": name},
        "spec": {
            "model": {
                "dim": 64,
                "layers": 2,
                "heads": 4,
                "kvHeads": 2,
                "ffnDim": 128,
                "seqLen": 32,
                "tiedEmbeddings": tied,
            },
            "data": {
                "sources": [str(corpus)],
                "tokenizer": tokenizer or {"kind": "byte"},
            },
            "training": {
                "steps": steps,
                "microBatchSize": 2,
                "microBatches": 2,
                "learningRate": 3e-3,
                "weightDecay": 0.1,
                "seed": 7,
                "threads": 2,
            },
            "pipeline": {"stages": stages},
        },
    }
    path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    return path


def run_cli(binary: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the binary, failing the test with its output when it fails."""
    proc = subprocess.run(
        [str(binary), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"`pipewright {' '.join(args)}` exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc
