"""``python -m service models tokenize|inspect|prepare`` (and ``localchat models``), run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli.console import main
from service.engine.models.gguf_tokenizer import build_tokenizer, read_gguf_tokenizer
from tests.conftest import REPO_ROOT
from tests.engine.gguf_files import llama_vocab


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", "models", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
        check=False,
    )


def test_tokenize_prints_ids_without_bos_or_specials(smollm2_gguf: Path) -> None:
    """Without --special: no BOS/EOS added and special-token text is plain text; the ids are
    those of our tokenizer."""
    text = "Hi <|im_end|> 2024 😀"
    result = _run("tokenize", str(smollm2_gguf), text)
    assert result.returncode == 0, result.stderr
    ids = json.loads(result.stdout)
    tokenizer = build_tokenizer(read_gguf_tokenizer(smollm2_gguf))
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.token_to_id("<|im_end|>") not in ids


def test_tokenize_reads_stdin_and_special_adds_bos() -> None:
    """Text from stdin, exactly as read (the newline too); --special adds the file's BOS and reads
    '</s>' as the end token. Works on a vocabulary-only file (Llama 2's: no tensors)."""
    vocab = str(llama_vocab("llama-spm"))
    plain = _run("tokenize", vocab, stdin="Hello</s>\n")
    special = _run("tokenize", "--special", vocab, stdin="Hello</s>\n")
    assert plain.returncode == special.returncode == 0, plain.stderr + special.stderr
    plain_ids, special_ids = json.loads(plain.stdout), json.loads(special.stdout)
    assert plain_ids[0] != 1
    assert 2 not in plain_ids
    assert special_ids[0] == 1
    assert 2 in special_ids
    assert special_ids[-1] == 13  # the newline (<0x0A>) read from stdin


def test_inspect_a_runnable_model(smollm2_gguf: Path) -> None:
    """inspect --json: architecture, sizes, quantization types, context, tokenizer, template, and
    that it runs here; the plain form says the same in lines."""
    result = _run("inspect", "--json", str(smollm2_gguf))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["architecture"] == "llama"
    assert report["layers"] == 30
    assert report["hidden_size"] == 576
    assert 130e6 < report["parameters"] < 140e6
    assert report["file_type"] == "Q4_1"
    assert {"Q4_1", "F32"} <= set(report["quantization_types"])
    assert report["context_length"] == 8192
    assert report["tokenizer"]["kind"] == "gpt2"
    assert report["tokenizer"]["pre"] == "smollm"
    assert report["tokenizer"]["end_tokens"] == ["<|endoftext|>", "<|im_end|>"]
    assert (report["chat_template"], report["runnable"], report["reason"]) == (True, True, None)
    lines = _run("inspect", str(smollm2_gguf)).stdout
    assert "runs here:      yes" in lines
    assert "chat template:  yes" in lines


def test_inspect_says_why_a_file_cannot_run() -> None:
    """A vocabulary-only file is described, and reported as not runnable, with the reason."""
    result = _run("inspect", "--json", str(llama_vocab("llama-bpe")))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tensors"] == 0
    assert report["tokenizer"]["pre"] == "llama-bpe"
    assert report["runnable"] is False
    assert "no weights" in report["reason"]


@pytest.mark.parametrize("action", ["tokenize", "inspect"])
def test_not_a_gguf_file_is_one_line_error(action: str, tmp_path: Path) -> None:
    """A file that is not GGUF (or is missing) fails with exit 1 and one 'error:' line, no
    traceback."""
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    for path in (bogus, tmp_path / "missing.gguf"):
        result = _run(action, str(path), *(["x"] if action == "tokenize" else []))
        assert result.returncode == 1
        assert result.stderr.startswith("error: "), result.stderr
        assert result.stderr.count("\n") == 1, result.stderr


def test_localchat_models_is_python_m_service_models(
    smollm2_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The installed ``localchat models`` runs the same actions: tokenize gives the ids ``python -m
    service models`` prints, and prepare builds a model and prints its directory."""
    assert main(["models", "tokenize", str(smollm2_gguf), "Hello there"]) == 0
    ids = json.loads(capsys.readouterr().out)
    assert ids == json.loads(_run("tokenize", str(smollm2_gguf), "Hello there").stdout)
    model = ["--model", str(smollm2_gguf), "--data-dir", str(tmp_path), "--precision", "int4"]
    assert main(["models", "prepare", *model, "--quiet"]) == 0
    directory = Path(capsys.readouterr().out.strip())
    assert directory.parent.parent == tmp_path
    assert (directory / "localchat.json").is_file()
