"""Regenerate the shipped CLIP tokenizer files under `lora_ext/data/tokenizer/` from the BPE table in a wheel.

The only input is `bpe_simple_vocab_16e6.txt.gz`, the byte-pair-encoding table OpenAI's CLIP ships. The same file is
inside the `clip-anytorch` wheel (`clip/`) and the `open-clip-torch` wheel (`open_clip/`). From it we derive the files
`transformers.CLIPTokenizer` reads, exactly the way CLIP's own `SimpleTokenizer` builds its vocabulary:

    vocab = 256 byte symbols + the same 256 symbols with "</w>" + one token per merge (48 894 merges) +
            "<|startoftext|>" (49406) + "<|endoftext|>" (49407)            -> 49 408 tokens

Two directories are written (identical vocabulary, different padding token):

    clip/      SD1.x text encoder and SDXL's first one (CLIP ViT-L/14): pad token "<|endoftext|>" (id 49407)
    openclip/  SD2.x text encoder and SDXL's second one (OpenCLIP ViT-H / bigG): pad token "!" (id 0), which is what
               OpenCLIP pads with and what diffusers' SD2 `tokenizer/` and SDXL `tokenizer_2/` folders declare

Usage (from the repository root):

    pip download --no-deps clip-anytorch==2.6.0 -d /tmp/wheels        # or open-clip-torch
    python tools/make_tokenizer.py --wheel /tmp/wheels/clip_anytorch-2.6.0-py3-none-any.whl

    python tools/make_tokenizer.py                  # no --wheel: runs the `pip download` above into a temp dir
    python tools/make_tokenizer.py --bpe .../open_clip/bpe_simple_vocab_16e6.txt.gz   # an installed copy

Output is byte-for-byte reproducible; re-running on the same table changes nothing.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48 894 merges of the table (its vocab size is 49 408)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "lora_ext" / "data" / "tokenizer"


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP BPE use for bytes 0..255, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    # printable bytes stand for themselves; the other 68 bytes get code points 256, 257, ... in byte order
    others = [chr(256 + i) for i, _ in enumerate(b for b in range(256) if b not in printable)]
    return [chr(b) for b in printable] + others


def read_bpe_from_wheel(wheel: Path) -> bytes:
    """The gzip'ed BPE table inside a clip-anytorch or open-clip-torch wheel."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith("/" + BPE_NAME)]
        if not names:
            raise SystemExit(f"{wheel}: no */{BPE_NAME} inside")
        return zf.read(sorted(names)[0])


def build_vocab(bpe_gz: bytes) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges in rank order) from the gzip'ed table."""
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]  # line 0 is a version header
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise SystemExit("unexpected BPE table: wrong number or shape of merges")
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != 49408:
        raise SystemExit(f"unexpected vocabulary size {len(vocab)} (want 49408)")
    return vocab, merges  # type: ignore[return-value]


def special_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def write_dir(out: Path, vocab: dict[str, int], merges: list[tuple[str, str]], pad: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    config = {
        "add_prefix_space": False,
        "bos_token": special_token(BOS),
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": special_token(EOS),
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": special_token(EOS),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": pad, "unk_token": EOS}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def write_tokenizers(bpe_gz: bytes, out: Path) -> None:
    """Write `out/clip` and `out/openclip` from the gzip'ed BPE table."""
    vocab, merges = build_vocab(bpe_gz)
    write_dir(out / "clip", vocab, merges, pad=EOS)
    write_dir(out / "openclip", vocab, merges, pad="!")


def download_wheel(dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "clip-anytorch==2.6.0", "-d", str(dest)],
                   check=True)
    return next(dest.glob("clip_anytorch-*.whl"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheel", type=Path, help="clip-anytorch or open-clip-torch wheel (default: pip download one)")
    ap.add_argument("--bpe", type=Path, help=f"the {BPE_NAME} file itself (instead of --wheel)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output root (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    if args.bpe is not None:
        bpe_gz = args.bpe.read_bytes()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            bpe_gz = read_bpe_from_wheel(args.wheel or download_wheel(Path(tmp)))
    write_tokenizers(bpe_gz, args.out)
    print(f"wrote {args.out / 'clip'} and {args.out / 'openclip'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
