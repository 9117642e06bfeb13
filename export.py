"""
Move models between this repository, llama2.c and Hugging Face, in both directions.

    python export.py model.bin --version 0 --checkpoint out/ckpt.pt    # llama2.c legacy fp32 (run.c)
    python export.py model.bin --version 1 --checkpoint out/ckpt.pt    # fp32 with a versioned header
    python export.py model_q80.bin --version 2 --checkpoint out/ckpt.pt  # Q8_0 int8 (runq.c)
    python export.py hf_model --version -1 --checkpoint out/ckpt.pt    # a Hugging Face LlamaForCausalLM folder
    python export.py model.gguf --checkpoint out/ckpt.pt [--dtype=fp16|q8_0]  # GGUF for llama.cpp (pip install gguf)
    python tokenizer.py --tokenizer-model=data/tok512.model            # the tokenizer for run.c

Every script loads all of these formats through load_model(): a .pt checkpoint, a llama2.c .bin
(versions 0, 1, 2), a GGUF file or a Hugging Face folder (config.json + safetensors), detected from the file itself.
Meta/llama2.c rotate interleaved pairs in RoPE while Hugging Face rotates halves; the q/k weights are
permuted on the way out and back, so logits agree to float precision.
"""
import argparse
import json
import os
import struct
import sys

import numpy as np
import torch

from model import ModelArgs, Transformer
from checkpoint import load_checkpoint, load_model_state, model_from_checkpoint
from utils import atomic_write

MAGIC = 0x616B3432  # "ak42" in ASCII: llama2.c's versioned .bin header


class FormatError(ValueError):
    pass


# -----------------------------------------------------------------------------
# llama2.c .bin

def _legacy_order(model: Transformer):
    """Version 0's weights in file order: embeddings, then each kind of tensor for all layers, the final norm,
    and the RoPE tables."""
    L = model.layers
    return [model.tok_embeddings.weight, *(l.attention_norm.weight for l in L),
            *(l.attention.wq.weight for l in L), *(l.attention.wk.weight for l in L),
            *(l.attention.wv.weight for l in L), *(l.attention.wo.weight for l in L),
            *(l.ffn_norm.weight for l in L), *(l.feed_forward.w1.weight for l in L),
            *(l.feed_forward.w2.weight for l in L), *(l.feed_forward.w3.weight for l in L),
            model.norm.weight, model.freqs_cos[: model.params.max_seq_len],
            model.freqs_sin[: model.params.max_seq_len]]


def _versioned_order(model: Transformer):
    """Versions 1 and 2: (the norms, kept in fp32; the matrices, quantized in version 2), each in file order."""
    L = model.layers
    norms = [*(l.attention_norm.weight for l in L), *(l.ffn_norm.weight for l in L), model.norm.weight]
    mats = [model.tok_embeddings.weight,
            *(l.attention.wq.weight for l in L), *(l.attention.wk.weight for l in L),
            *(l.attention.wv.weight for l in L), *(l.attention.wo.weight for l in L),
            *(l.feed_forward.w1.weight for l in L), *(l.feed_forward.w2.weight for l in L),
            *(l.feed_forward.w3.weight for l in L)]
    return norms, mats


def _header(p: ModelArgs, shared: bool, signed_vocab: bool):
    vocab = p.vocab_size if shared or not signed_vocab else -p.vocab_size
    return struct.pack("iiiiiii", p.dim, p.hidden_dim, p.n_layers, p.n_heads, p.n_kv_heads, vocab, p.max_seq_len)


def quantize_q80(w: torch.Tensor, group_size: int):
    """Symmetric int8 per group of group_size values: w ~ int8 * scale. Returns (int8, scales, max error)."""
    w = w.float().reshape(-1, group_size)
    scale = w.abs().max(dim=1).values / 127.0
    q = torch.round(w / scale.clamp(min=1e-30)[:, None]).to(torch.int8)
    err = (q.float() * scale[:, None] - w).abs().max().item()
    return q, scale, err


def export_bin(model: Transformer, path: str, version: int, group_size: int = 64):
    p = model.params
    shared = p.tie_embeddings
    with atomic_write(path) as f:
        if version == 0:
            f.write(_header(p, shared, signed_vocab=True))
            for t in _legacy_order(model):
                f.write(t.detach().cpu().float().numpy().astype("<f4").tobytes())
            if not shared:
                f.write(model.output.weight.detach().cpu().float().numpy().astype("<f4").tobytes())
            return None
        header = struct.pack("Ii", MAGIC, version) + _header(p, shared, signed_vocab=False) + struct.pack("B", shared)
        if version == 2:
            while p.dim % group_size:
                group_size //= 2  # llama2.c: the group must divide dim
            header += struct.pack("i", group_size)
        f.write(header + b"\0" * (256 - len(header)))
        norms, mats = _versioned_order(model)
        if not shared:
            mats.append(model.output.weight)
        for t in norms:
            f.write(t.detach().cpu().float().numpy().astype("<f4").tobytes())
        if version == 1:
            for t in mats:
                f.write(t.detach().cpu().float().numpy().astype("<f4").tobytes())
            return None
        max_err = 0.0
        for t in mats:
            q, scale, err = quantize_q80(t.detach().cpu(), group_size)
            f.write(q.numpy().tobytes())
            f.write(scale.numpy().astype("<f4").tobytes())
            max_err = max(max_err, err)
        print(f"Q8_0 (group size {group_size}): max quantization error {max_err:.6f}")
        return max_err


def load_bin(path: str) -> Transformer:
    """A llama2.c .bin of version 0, 1 or 2 as a Transformer (Q8_0 weights are dequantized)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(256)
    if len(head) < 28:
        raise FormatError(f"{path}: {size} bytes is too short for a llama2.c model header")
    magic, version = struct.unpack("Ii", head[:8])
    if magic == MAGIC:
        if version not in (1, 2):
            raise FormatError(f"{path}: llama2.c format version {version} is not supported (0, 1 or 2)")
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq = struct.unpack("iiiiiii", head[8:36])
        shared = bool(head[36])
        group_size = struct.unpack("i", head[37:41])[0] if version == 2 else None
        offset = 256
    else:
        version, offset = 0, 28
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq = struct.unpack("iiiiiii", head[:28])
        shared = vocab > 0
        vocab = abs(vocab)
    try:
        args = ModelArgs(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                         vocab_size=vocab, max_seq_len=seq, tie_embeddings=shared)
    except (ValueError, ZeroDivisionError) as e:
        raise FormatError(f"{path}: not a llama2.c model (header says {e})") from None
    if not (0 < dim <= 1 << 16 and 0 < hidden <= 1 << 18 and 0 < n_layers <= 1024 and 0 < vocab <= 1 << 20
            and 0 < seq <= 1 << 20):
        raise FormatError(f"{path}: implausible llama2.c header (dim={dim}, layers={n_layers}, vocab={vocab})")
    model = Transformer(args)
    if version == 2 and (group_size is None or group_size <= 0 or dim % group_size):
        raise FormatError(f"{path}: Q8_0 group size {group_size} does not divide dim={dim}")
    # the read plan: (tensor or None to skip, encoding) in file order
    if version == 0:
        rope = [(None, 4 * seq * args.head_dim // 2)] * 2  # stored RoPE tables: recomputed, skipped
        plan = [(t, "f32") for t in _legacy_order(model)[:-2]] + rope
        if not shared:
            plan.append((model.output.weight, "f32"))
    else:
        norms, mats = _versioned_order(model)
        if not shared:
            mats.append(model.output.weight)
        plan = [(t, "f32") for t in norms] + [(t, "f32" if version == 1 else "q80") for t in mats]

    def nbytes(t, enc):
        if t is None:
            return enc
        return 4 * t.numel() if enc == "f32" else t.numel() + 4 * (t.numel() // group_size)

    expected = offset + sum(nbytes(t, enc) for t, enc in plan)
    if size != expected:
        raise FormatError(f"{path}: {size} bytes, but its header (version {version}, dim={dim}, layers={n_layers}, "
                          f"vocab={vocab}, seq_len={seq}) needs {expected}: a truncated or inconsistent file")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    pos = offset
    with torch.no_grad():
        for t, enc in plan:
            if t is not None:
                n = t.numel()
                if enc == "f32":
                    w = torch.from_numpy(np.frombuffer(data, dtype="<f4", count=n, offset=pos).copy())
                else:  # Q8_0: int8 values, then one float32 scale per group
                    q = torch.from_numpy(np.frombuffer(data, dtype=np.int8, count=n, offset=pos).copy()).float()
                    s = torch.from_numpy(np.frombuffer(data, dtype="<f4", count=n // group_size, offset=pos + n).copy())
                    w = q.view(-1, group_size) * s[:, None]
                t.copy_(w.view(t.shape))
            pos += nbytes(t, enc)
    return model


# -----------------------------------------------------------------------------
# Hugging Face

def permute_to_hf(w, n_heads):
    """Interleaved RoPE pairs (Meta) -> rotate-half layout (Hugging Face), per head, on rows of wq/wk."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def permute_from_hf(w, n_heads):
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def hf_config(p: ModelArgs, tied: bool, dtype="float32"):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": p.dim,
            "intermediate_size": p.hidden_dim, "num_hidden_layers": p.n_layers, "num_attention_heads": p.n_heads,
            "num_key_value_heads": p.n_kv_heads, "head_dim": p.head_dim, "vocab_size": p.vocab_size,
            "max_position_embeddings": p.max_seq_len, "rms_norm_eps": p.norm_eps, "rope_theta": p.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": p.rope_theta},
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": tied,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": dtype, "dtype": dtype}


def to_hf_state_dict(model: Transformer):
    p = model.params
    sd = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight}
    for i, l in enumerate(model.layers):
        pre = f"model.layers.{i}."
        sd[pre + "self_attn.q_proj.weight"] = permute_to_hf(l.attention.wq.weight, p.n_heads)
        sd[pre + "self_attn.k_proj.weight"] = permute_to_hf(l.attention.wk.weight, p.n_kv_heads)
        sd[pre + "self_attn.v_proj.weight"] = l.attention.wv.weight
        sd[pre + "self_attn.o_proj.weight"] = l.attention.wo.weight
        sd[pre + "mlp.gate_proj.weight"] = l.feed_forward.w1.weight
        sd[pre + "mlp.down_proj.weight"] = l.feed_forward.w2.weight
        sd[pre + "mlp.up_proj.weight"] = l.feed_forward.w3.weight
        sd[pre + "input_layernorm.weight"] = l.attention_norm.weight
        sd[pre + "post_attention_layernorm.weight"] = l.ffn_norm.weight
    if not p.tie_embeddings:
        sd["lm_head.weight"] = model.output.weight
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def export_hf(model: Transformer, folder: str, dtype=torch.float32):
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise SystemExit("error: the Hugging Face export needs safetensors: pip install safetensors") from None
    os.makedirs(folder, exist_ok=True)
    sd = {k: v.to(dtype) for k, v in to_hf_state_dict(model).items()}
    cfg = hf_config(model.params, tied="lm_head.weight" not in sd, dtype=str(dtype).replace("torch.", ""))
    tmp = os.path.join(folder, "model.safetensors.tmp")
    save_file(sd, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(folder, "model.safetensors"))
    with atomic_write(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def load_hf(folder: str) -> Transformer:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise FormatError("loading a Hugging Face folder needs safetensors: pip install safetensors") from None
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("model_type") != "llama":
        raise FormatError(f"{folder}: model_type {cfg.get('model_type')!r} is not llama")
    files = sorted(x for x in os.listdir(folder) if x.endswith(".safetensors"))
    if not files:
        raise FormatError(f"{folder}: no .safetensors weights (only safetensors are loaded: they cannot run code)")
    hf = {}
    for name in files:
        hf.update(load_file(os.path.join(folder, name)))
    n_heads = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_heads)
    rope = cfg.get("rope_parameters") or {}
    tied = cfg.get("tie_word_embeddings", True) and "lm_head.weight" not in hf
    args = ModelArgs(dim=cfg["hidden_size"], hidden_dim=cfg["intermediate_size"], n_layers=cfg["num_hidden_layers"],
                     n_heads=n_heads, n_kv_heads=n_kv, vocab_size=cfg["vocab_size"],
                     max_seq_len=cfg.get("max_position_embeddings", 2048), norm_eps=cfg.get("rms_norm_eps", 1e-5),
                     rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)), tie_embeddings=tied)
    sd = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    for i in range(args.n_layers):
        pre = f"model.layers.{i}."
        sd[f"layers.{i}.attention.wq.weight"] = permute_from_hf(hf[pre + "self_attn.q_proj.weight"], n_heads)
        sd[f"layers.{i}.attention.wk.weight"] = permute_from_hf(hf[pre + "self_attn.k_proj.weight"], n_kv)
        sd[f"layers.{i}.attention.wv.weight"] = hf[pre + "self_attn.v_proj.weight"]
        sd[f"layers.{i}.attention.wo.weight"] = hf[pre + "self_attn.o_proj.weight"]
        sd[f"layers.{i}.feed_forward.w1.weight"] = hf[pre + "mlp.gate_proj.weight"]
        sd[f"layers.{i}.feed_forward.w2.weight"] = hf[pre + "mlp.down_proj.weight"]
        sd[f"layers.{i}.feed_forward.w3.weight"] = hf[pre + "mlp.up_proj.weight"]
        sd[f"layers.{i}.attention_norm.weight"] = hf[pre + "input_layernorm.weight"]
        sd[f"layers.{i}.ffn_norm.weight"] = hf[pre + "post_attention_layernorm.weight"]
    if not tied:
        sd["output.weight"] = hf["lm_head.weight"]
    model = Transformer(args)
    load_model_state(model, {k: v.float() for k, v in sd.items()})
    return model


# -----------------------------------------------------------------------------
# GGUF (llama.cpp, Ollama, LM Studio), through the GGML project's own `gguf` package (optional: pip install gguf)

GGUF_DTYPES = {"fp32": "ALL_F32", "fp16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}  # --dtype -> gguf.LlamaFileType
GGUF_QUANT = {"q8_0": "Q8_0"}  # --dtype -> gguf.GGMLQuantizationType of the matrices (32-value blocks)
# our parameter names -> llama.cpp's tensor names (LLM_ARCH_LLAMA)
GGUF_LAYER_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
                    "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
                    "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise FormatError("GGUF needs the gguf package (the GGML project's reader and writer): pip install gguf") \
            from None
    return gguf


def gguf_tensor_names(n_layers: int):
    names = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "output.weight": "output.weight"}
    for i in range(n_layers):
        for ours, theirs in GGUF_LAYER_NAMES.items():
            names[f"layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    return names


def export_gguf(model: Transformer, path: str, tokenizer_model: str, dtype: str = "fp32"):
    """Write model as a GGUF file in llama.cpp's `llama` architecture, with the sentencepiece tokenizer embedded, so
    that llama.cpp needs no other file. dtype: fp32; fp16 (every matrix); q8_0 (every matrix whose rows are a
    multiple of Q8_0's 32-value blocks, the others fp16, as llama.cpp's own converter does). Norms stay fp32.
    wq and wk are written as they are: llama.cpp rotates adjacent pairs for this architecture (LLAMA_ROPE_TYPE_NORM),
    Meta's layout and ours. (Its converter permutes Hugging Face's q/k only to undo HF's rotate-half layout.)"""
    gguf = _gguf()
    from sentencepiece import SentencePieceProcessor
    if dtype not in GGUF_DTYPES:
        raise FormatError(f"GGUF --dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    p = model.params
    sp = SentencePieceProcessor(model_file=tokenizer_model)
    if sp.vocab_size() != p.vocab_size:
        raise FormatError(f"vocab mismatch: {tokenizer_model} has {sp.vocab_size()} tokens, the model {p.vocab_size}")
    tmp = path + ".tmp"
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(os.path.splitext(os.path.basename(path))[0])
    w.add_file_type(getattr(gguf.LlamaFileType, GGUF_DTYPES[dtype]))
    hyperparameters = {  # llama.<key> in the file
        w.add_context_length: p.max_seq_len, w.add_embedding_length: p.dim, w.add_block_count: p.n_layers,
        w.add_feed_forward_length: p.hidden_dim, w.add_head_count: p.n_heads, w.add_head_count_kv: p.n_kv_heads,
        w.add_key_length: p.head_dim, w.add_value_length: p.head_dim, w.add_rope_dimension_count: p.head_dim,
        w.add_rope_freq_base: p.rope_theta, w.add_layer_norm_rms_eps: p.norm_eps, w.add_vocab_size: p.vocab_size}
    for setter, value in hyperparameters.items():
        setter(value)
    # the tokenizer: llama.cpp's SPM model from the pieces, their scores and types
    types = gguf.TokenType
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i).encode("utf-8") for i in range(sp.vocab_size())])
    w.add_token_scores([sp.get_score(i) for i in range(sp.vocab_size())])
    w.add_token_types([types.UNKNOWN if sp.is_unknown(i) else types.CONTROL if sp.is_control(i) else
                       types.BYTE if sp.is_byte(i) else types.UNUSED if sp.is_unused(i) else types.NORMAL
                       for i in range(sp.vocab_size())])
    for setter, token_id in ((w.add_bos_token_id, sp.bos_id()), (w.add_eos_token_id, sp.eos_id()),
                             (w.add_unk_token_id, sp.unk_id())):
        if token_id >= 0:
            setter(token_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    names = gguf_tensor_names(p.n_layers)
    for name, t in model.state_dict().items():
        if name == "output.weight" and p.tie_embeddings:
            continue  # llama.cpp uses token_embd when there is no output.weight
        data = t.detach().float().cpu().numpy()
        if data.ndim == 2 and dtype in GGUF_QUANT and data.shape[1] % 32 == 0:
            qtype = getattr(gguf.GGMLQuantizationType, GGUF_QUANT[dtype])
            w.add_tensor(names[name], gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(names[name], data.astype(np.float16) if data.ndim == 2 and dtype != "fp32" else data)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def gguf_fields(path: str):
    """The metadata of a GGUF file as {key: value} and its reader (a one-line FormatError for anything else)."""
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(path)
        fields = {k: f.contents() for k, f in reader.fields.items()}
        reader.tensors  # noqa: B018  (memory-mapped and checked against the file's size while reading)
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors... on a damaged file
        raise FormatError(f"{path}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})") \
            from None
    return fields, reader


def load_gguf(path: str) -> Transformer:
    """A GGUF file of llama.cpp's `llama` architecture (f32, f16, bf16 or q8_0 tensors, dequantised to float32)."""
    gguf = _gguf()
    fields, reader = gguf_fields(path)
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise FormatError(f"{path}: GGUF architecture {arch!r}, but only 'llama' is supported")
    try:
        n_heads = fields["llama.attention.head_count"]
        dim = fields["llama.embedding_length"]
        tensors = {t.name: t for t in reader.tensors}
        vocab = fields.get("llama.vocab_size") or len(fields["tokenizer.ggml.tokens"])
        args = ModelArgs(dim=dim, n_layers=fields["llama.block_count"], n_heads=n_heads,
                         n_kv_heads=fields.get("llama.attention.head_count_kv", n_heads), vocab_size=vocab,
                         hidden_dim=fields["llama.feed_forward_length"],
                         max_seq_len=fields.get("llama.context_length", 2048),
                         # GGUF stores these as float32: 7 significant digits give back the 1e-5 that was written
                         norm_eps=float(f'{fields.get("llama.attention.layer_norm_rms_epsilon", 1e-5):.7g}'),
                         rope_theta=float(f'{fields.get("llama.rope.freq_base", 10000.0):.7g}'),
                         tie_embeddings="output.weight" not in tensors)
    except KeyError as e:
        raise FormatError(f"{path}: GGUF metadata lacks {e.args[0]}") from None
    if args.head_dim != fields.get("llama.rope.dimension_count", args.head_dim):
        raise FormatError(f"{path}: partial RoPE (rope.dimension_count != head_dim) is not supported")
    supported = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16,
                 gguf.GGMLQuantizationType.Q8_0}
    sd = {}
    for ours, theirs in gguf_tensor_names(args.n_layers).items():
        if theirs not in tensors:
            if ours == "output.weight":
                continue
            raise FormatError(f"{path}: GGUF tensor {theirs} is missing")
        t = tensors[theirs]
        if t.tensor_type not in supported:
            raise FormatError(f"{path}: {theirs} is {t.tensor_type.name}; supported: F32, F16, BF16, Q8_0 "
                              f"(re-export it with one of those)")
        sd[ours] = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).copy())
    model = Transformer(args)
    load_model_state(model, sd)
    return model


def load_model(path: str):
    """Any supported checkpoint -> (Transformer in eval mode, the checkpoint's config dict or {})."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FormatError(f"{path} is a folder without config.json: not a Hugging Face model")
        return load_hf(path).eval(), {}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    with open(path, "rb") as f:
        first = f.read(4)
    if first == b"GGUF":
        return load_gguf(path).eval(), {}
    if first[:2] == b"PK":  # torch.save's zip container
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
            raise FormatError(f"{path}: a PyTorch file, but not a checkpoint of this repository (model, model_args)")
        return model_from_checkpoint(ckpt), ckpt.get("config", {})
    if path.endswith(".bin") or (len(first) == 4 and struct.unpack("I", first)[0] == MAGIC):
        return load_bin(path).eval(), {}
    raise FormatError(f"{path}: unknown format (expected a .pt checkpoint, a llama2.c .bin, a GGUF file or a Hugging "
                      f"Face folder)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("filepath", type=str, help="the output file (a .gguf path writes GGUF), or folder for --version -1")
    parser.add_argument("--version", default=0, type=int, help="0, 1, 2 (llama2.c) or -1 (Hugging Face)")
    parser.add_argument("--dtype", type=str, default="fp32", choices=["fp32", "fp16", "bf16", "q8_0"],
                        help="weights of the Hugging Face (fp32, fp16, bf16) or GGUF (fp32, fp16, q8_0) export")
    parser.add_argument("--tokenizer", type=str, default="",
                        help="GGUF: the sentencepiece model to embed (default: found next to the checkpoint or in data/)")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--checkpoint", type=str, help="a .pt, a llama2.c .bin or a Hugging Face folder")
    group.add_argument("--hf", type=str, help="a Hugging Face folder (same as --checkpoint)")
    args = parser.parse_args()
    if args.version not in (-1, 0, 1, 2):
        parser.error(f"--version must be 0, 1, 2 or -1 (Hugging Face), got {args.version}")
    gguf_out = args.filepath.endswith(".gguf")
    if (args.dtype == "q8_0" and not gguf_out) or (args.dtype == "bf16" and gguf_out):
        parser.error(f"--dtype={args.dtype} is not available for {'GGUF' if gguf_out else 'this format'}: GGUF takes "
                     f"fp32, fp16, q8_0; Hugging Face fp32, fp16, bf16")
    try:
        model, config = load_model(args.checkpoint or args.hf)
        if gguf_out:
            from tokenizer import find_tokenizer
            tok = args.tokenizer or find_tokenizer(model.params.vocab_size, near=args.checkpoint or args.hf,
                                                   config=config)
            export_gguf(model, args.filepath, tok, args.dtype)
    except (FormatError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    if args.version == -1 and not gguf_out:
        export_hf(model, args.filepath, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype])
    elif not gguf_out:
        export_bin(model, args.filepath, args.version)
    print(f"wrote {args.filepath}")


if __name__ == "__main__":
    main()
