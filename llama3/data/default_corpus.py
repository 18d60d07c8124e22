"""The built-in corpus: the docstrings of the Python standard library, one document per module.

Every Python installation carries it, so `llama3 train` works with no data and no network. It is
English prose about programming, about 1.7 M characters (about 400 k Llama 3 tokens) on Python 3.11: enough to watch
a small model learn, not to train a useful one. It is built once per Python version and tokenizer into
$LLAMA3_HOME/data (default ~/.cache/llama3/data).
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import json
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

from llama3 import hub
from llama3.data.prepare import PrepareConfig, prepare
from llama3.data.quality import QualityConfig
from llama3.data.shards import INDEX_FILE, write_atomic

# Parts of the standard library that are tests, demos or vendored third-party code, not documentation.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}

# Gopher's thresholds are for web pages. Module documentation repeats itself by nature ("Return a new
# ...", examples that import the module), and the repetition filters would drop the richest modules
# (json, os, re, inspect ...); they are loosened or off here. Near-empty modules still go.
DEFAULT_CORPUS_QUALITY = QualityConfig(
    min_words=20,
    min_mean_word_length=2.0,
    max_mean_word_length=12.0,
    min_alpha_word_fraction=0.5,
    max_symbol_word_ratio=None,
    max_ellipsis_line_fraction=None,
    max_duplicate_line_fraction=0.5,
    max_duplicate_line_char_fraction=0.5,
    max_top_ngram_char_fraction=None,
    max_duplicate_ngram_char_fraction=None,
)


def _tokenizer_tag(tokenizer) -> str:
    if isinstance(tokenizer, (str, Path)) and str(tokenizer) != "llama3":
        # tokenizer files are often all called tokenizer.model: tell them apart by where they are
        path = Path(tokenizer).resolve()
        return f"{path.stem}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if isinstance(tokenizer, (str, Path)):
        return "llama3"
    return getattr(tokenizer, "name", None) or type(tokenizer).__name__


def default_corpus_dir(tokenizer="llama3") -> Path:
    """Where the built-in corpus for this Python version and tokenizer lives (built or not)."""
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    return hub.home() / "data" / f"stdlib-docs-{version}-{_tokenizer_tag(tokenizer)}"


def stdlib_documents(stdlib: Path | None = None) -> Iterator[str]:
    """One document per standard library module: its name as a heading, then the docstrings of the
    module, its classes and functions, in source order."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if _SKIP_DIRS.intersection(relative.parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately broken (test fixtures) or not UTF-8
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        sections = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    title = module if isinstance(node, ast.Module) else node.name
                    sections.append(f"{title}\n\n{doc}")
        if sections:
            yield f"# {module}\n\n" + "\n\n".join(sections) + "\n"


def prepare_default_corpus(out_dir: str | Path | None = None, tokenizer="llama3", workers: int | None = None) -> Path:
    """Build the built-in corpus into `out_dir` (default: default_corpus_dir(tokenizer)) unless it is
    there already; returns the directory. Safe to call from several processes at once (the first
    builds, the others wait for it)."""
    out = Path(out_dir) if out_dir is not None else default_corpus_dir(tokenizer)
    if (out / INDEX_FILE).exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / INDEX_FILE).exists():
            # The source is written once and then kept, so an interrupted build resumes against the
            # same input file.
            source = out / "source" / "stdlib-docs.jsonl"
            if not source.exists():
                source.parent.mkdir(exist_ok=True)
                lines = "".join(json.dumps({"text": doc}) + "\n" for doc in stdlib_documents())
                write_atomic(source, lambda f: f.write(lines.encode("utf-8")))
            config = PrepareConfig(quality=DEFAULT_CORPUS_QUALITY, shard_tokens=1 << 20)
            prepare([source], out, tokenizer, config, workers=workers, progress=False)
    return out
