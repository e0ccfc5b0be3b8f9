"""Build ``tiny-llama``: a deterministic, random-weight Llama that real vLLM can serve on a CPU.

No model can be downloaded here, so tests and the default deployment run on a model built locally:

* a byte-level BPE tokenizer trained with ``tokenizers`` on ``models/data/tiny_corpus.txt``;
* a Llama (hidden 128, 2 layers, 2 heads of head_dim 64 — vLLM's CPU build rejects head_dim 16)
  with weights drawn from a seeded generator;
* a chat template (Llama-3 style headers).

The output directory is named by a hash of everything that goes into it (this file, the corpus, the
shape), so a rebuild with unchanged inputs returns at once, and two builds are byte-identical.

Usage: ``tokenweir models build-tiny`` or ``python -m models.tiny [--out DIR]``.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

TINY_MODEL_NAME = "tiny-llama"
_DATA = Path(__file__).resolve().parent / "data" / "tiny_corpus.txt"
_SEED = 20261126
_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 2048,
}
_VOCAB_SIZE = 512
_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|unk|>",
]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def cache_root() -> Path:
    """Where built models live: ``$TOKENWEIR_HOME/models`` (default ``~/.cache/tokenweir/models``)."""
    home = os.environ.get("TOKENWEIR_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "tokenweir")
    return Path(home) / "models"


def content_hash() -> str:
    """Hash of every input of the build: this builder's source, the corpus and the shape."""
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(_DATA.read_bytes())
    h.update(json.dumps([_SHAPE, _VOCAB_SIZE, _SEED, _SPECIAL], sort_keys=True).encode())
    return h.hexdigest()[:16]


def build_tiny_model(out_dir: Path | None = None) -> Path:
    """Build (or find, when already built) the tiny model and return its directory."""
    target = Path(out_dir) if out_dir else cache_root() / f"{TINY_MODEL_NAME}-{content_hash()}"
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Replicas on one node build it at once (each resolves `builtin:` on its own node): one builds,
    # the others wait on the lock and find it complete, so none replaces a directory another reads.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _complete(target):
            _build(target)
    return target


def _complete(target: Path) -> bool:
    return (target / "model.safetensors").exists() and (target / ".complete").exists()


def _build(target: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        _write_tokenizer(tmp)
        _write_model(tmp)
        (tmp / ".complete").write_text(content_hash() + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _ascii_alphabet() -> list[str]:
    """The byte-level pre-tokenizer's characters for bytes 0..127 (GPT-2's byte-to-unicode map)."""
    printable = list(range(ord("!"), ord("~") + 1))
    mapping, n = {}, 0
    for b in range(256):
        if b in printable or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + n)
            n += 1
    return [mapping[b] for b in range(128)]


def _write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=_SPECIAL,
        # ASCII bytes only: with all 256 a random-weight model often samples a lone high byte, an
        # incomplete UTF-8 sequence that detokenizes to nothing, so streams would carry silent
        # tokens. Other characters encode as <|unk|>.
        initial_alphabet=_ascii_alphabet(),
        show_progress=False,
    )
    text = _DATA.read_text()
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "pad_token": "<|end_of_text|>",
        "model_max_length": _SHAPE["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")


def _write_model(out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    bos, eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|eot_id|>")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": tok.token_to_id("<|end_of_text|>"),
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "initializer_range": 0.02,
        **_SHAPE,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    gen = {"bos_token_id": bos, "eos_token_id": eos, "do_sample": True}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")

    g = torch.Generator().manual_seed(_SEED)
    h, inter, heads, kvh, hd = (
        _SHAPE["hidden_size"],
        _SHAPE["intermediate_size"],
        _SHAPE["num_attention_heads"],
        _SHAPE["num_key_value_heads"],
        _SHAPE["head_dim"],
    )

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).contiguous()

    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": w(vocab, h)}
    for i in range(_SHAPE["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = w(heads * hd, h)
        tensors[p + "self_attn.k_proj.weight"] = w(kvh * hd, h)
        tensors[p + "self_attn.v_proj.weight"] = w(kvh * hd, h)
        tensors[p + "self_attn.o_proj.weight"] = w(h, heads * hd)
        tensors[p + "mlp.gate_proj.weight"] = w(inter, h)
        tensors[p + "mlp.up_proj.weight"] = w(inter, h)
        tensors[p + "mlp.down_proj.weight"] = w(h, inter)
        tensors[p + "input_layernorm.weight"] = torch.ones(h)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(h)
    tensors["model.norm.weight"] = torch.ones(h)
    tensors["lm_head.weight"] = w(vocab, h)
    save_file(dict(sorted(tensors.items())), str(out / "model.safetensors"), metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default: content-hashed cache)"
    )
    args = parser.parse_args(argv)
    print(build_tiny_model(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
