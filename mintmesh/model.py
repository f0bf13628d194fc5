"""The embedded backbone and the base-model fingerprint.

`init_model(preset, dir)` writes a Llama-family causal LM with deterministic weights (fixed seed)
and a byte-level tokenizer, in Hugging Face format, loadable with `from_pretrained` and no hub.
`fingerprint(dir)` hashes the config and every weight's name and shape: adapters are checked
against it on upload.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# Byte-level vocabulary: ids 0..255 are the bytes, then the special tokens.
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
BYTE_VOCAB = 259

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PRESETS: dict[str, dict] = {
    # ~0.1M parameters: for tests.
    "tiny": dict(
        vocab_size=BYTE_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,
    ),
    # ~170M parameters: for benchmarks.
    "small": dict(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
        initializer_range=0.02,
    ),
}

SEED = 1234


def _byte_tokenizer(model_max_length: int):
    """A byte-level BPE with no merges: every byte is one token, specials after them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # Map each byte value to the ByteLevel unicode char, in byte order, so id == byte value.
    bytes_to_unicode = _bytes_to_unicode()
    vocab = {bytes_to_unicode[b]: b for b in range(256)}
    assert set(vocab) == set(byte_chars)
    vocab.update({"<s>": BOS_ID, "</s>": EOS_ID, "<pad>": PAD_ID})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=model_max_length,
    )
    out.chat_template = CHAT_TEMPLATE
    return out


# The embedded backbone's chat format (Zephyr-like): each turn "<|role|>\n" + content + EOS, the
# assistant's turn opened at the end. Saved with the tokenizer, so apply_chat_template uses it.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}"
    "\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    # The GPT-2 byte -> printable unicode table used by ByteLevel.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def init_model(preset: str, out_dir: Path | str) -> Path:
    """Write the preset model (deterministic weights) and tokenizer to out_dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(
        **PRESETS[preset],
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        attention_bias=False,
        mlp_bias=False,
    )
    torch.manual_seed(SEED)
    with torch.no_grad():
        model = LlamaForCausalLM(cfg)
        model.eval()
    model.save_pretrained(out, safe_serialization=True)
    _byte_tokenizer(cfg.max_position_embeddings).save_pretrained(out)
    (out / "mintmesh.json").write_text(json.dumps({"preset": preset, "seed": SEED}) + "\n")
    logger.info("wrote %s backbone to %s", preset, out)
    return out


def model_ready(model_dir: Path | str) -> bool:
    """Whether model_dir holds a whole backbone (as build_preset leaves one)."""
    d = Path(model_dir)
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def build_preset(preset: str, model_dir: Path | str) -> Path:
    """init_model into model_dir, whole or not at all: built in a temporary directory beside it
    and moved into place with config.json last, so an interrupted build is never mistaken for
    a model (model_ready)."""
    import tempfile

    d = Path(model_dir)
    d.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{preset}-", dir=d.parent))
    init_model(preset, tmp)
    files = sorted(tmp.iterdir(), key=lambda f: f.name == "config.json")
    for f in files:
        f.replace(d / f.name)
    tmp.rmdir()
    return d


@dataclass(frozen=True)
class BaseModelInfo:
    """What the store needs to validate adapters: no weights, just shapes."""

    fingerprint: str
    model_type: str
    # Module path (e.g. "model.layers.0.self_attn.q_proj") -> (out_features, in_features).
    linear_shapes: dict[str, tuple[int, int]]
    num_layers: int

    def targetable(self) -> list[str]:
        return sorted({m.rsplit(".", 1)[-1] for m in self.linear_shapes})


def base_model_info(model_dir: Path | str) -> BaseModelInfo:
    """Fingerprint and Linear shapes of the model in model_dir, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in model directory {model_dir}")
    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    shapes = {name: list(p.shape) for name, p in model.state_dict().items()}
    linear_shapes = {
        name: (mod.out_features, mod.in_features)
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGET_MODULES
    }
    keys = (
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rope_theta",
        "rms_norm_eps",
        "tie_word_embeddings",
    )
    cfg_d = cfg.to_dict()
    essential = {k: cfg_d.get(k) for k in keys}
    blob = json.dumps({"config": essential, "shapes": shapes}, sort_keys=True).encode()
    fp = hashlib.sha256(blob).hexdigest()
    return BaseModelInfo(
        fingerprint=fp,
        model_type=str(cfg_d.get("model_type")),
        linear_shapes=linear_shapes,
        num_layers=int(cfg_d.get("num_hidden_layers") or 0),
    )


def load_model(model_dir: Path | str, *, device: str = "cpu", dtype=None):
    """Load (model, tokenizer) from a local directory; never touches the network."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, local_files_only=True
    ).to(device)
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    return model, tok
