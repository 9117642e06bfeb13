"""
This repository's checkpoint layout, read and written in one place. A checkpoint is llama2.c's dict:
{"model": state dict, "model_args": ModelArgs as a dict, "iter_num", "best_val_loss", "config"}, plus what a
script adds (train.py: "optimizer" and "resume"; PPO: "ppo_state"; the RLHF chain: "kind", "task", ...).
Loading is weights-only (a downloaded .pt can never run code) with one-line errors; saving is atomic (a crash
leaves the previous file). Other formats (llama2.c .bin, Hugging Face folders) are export.py's; its load_model
reads every format and comes here for a .pt.
"""
import os
import pickle
import zipfile
from dataclasses import asdict

import torch

from model import ModelArgs, Transformer, TransformerWithValueHead
from utils import atomic_write, fail


def model_checkpoint(model, iter_num=0, best_val_loss=0.0, config=None, **extra):
    """The checkpoint dict of a model (its weights and ModelArgs) and whatever the caller adds."""
    return {"model": model.state_dict(), "model_args": asdict(model.params), "iter_num": iter_num,
            "best_val_loss": best_val_loss, "config": config or {}, **extra}


def save_checkpoint(obj, path):
    """torch.save(obj) to path, atomically. A save that fails (a full disk, a quota, a lost mount) leaves the
    previous file and ends the run in one line naming the path and the cause."""
    try:
        with atomic_write(path) as f:
            torch.save(obj, f)
    except OSError as e:  # a write into the file object fails with the OSError itself (ENOSPC: errno 28)
        cause = e.strerror or str(e)
        fail(f"could not save {path} ({cause}); the previous file there is intact: free some space, then resume "
             f"the run (train.py: --init_from=resume)")


def load_checkpoint(path, map_location="cpu"):
    """torch.load with weights_only=True (a checkpoint can never run code), and one-line errors for a
    missing, truncated or malicious file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported object"
        raise ValueError(f"refusing to load {path}: it holds objects a weights-only load does not allow "
                         f"({first[:160]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"cannot read checkpoint {path}: truncated or not a PyTorch checkpoint "
                         f"({str(e).splitlines()[0][:120]})") from None


def clean_state_dict(state_dict):
    """Strip the prefixes that torch.compile ("_orig_mod.") and DDP ("module.") add to keys."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def model_args_from_checkpoint(checkpoint) -> ModelArgs:
    """The ModelArgs a checkpoint was trained with. Checkpoints from before the tie_embeddings flag (and
    llama2.c's) are tied unless their classifier differs from their embedding."""
    fields = ModelArgs.__dataclass_fields__
    args = {k: v for k, v in checkpoint["model_args"].items() if k in fields}
    if "tie_embeddings" not in args:
        sd = clean_state_dict(checkpoint["model"])
        out = sd.get("output.weight")
        args["tie_embeddings"] = out is None or torch.equal(out, sd["tok_embeddings.weight"])
    return ModelArgs(**args)


def load_model_state(model: Transformer, state_dict):
    """Load a checkpoint's weights into model, refusing any that do not fit. A plain Transformer checkpoint
    loads into a TransformerWithValueHead (the value head keeps its fresh init) and vice versa (it is
    dropped). A tied model takes only a checkpoint whose classifier is its embedding (or absent)."""
    state_dict = clean_state_dict(state_dict)
    emb, out = state_dict.get("tok_embeddings.weight"), state_dict.get("output.weight")
    if model.params.tie_embeddings and emb is not None:
        if out is not None and not torch.equal(out, emb):
            raise ValueError("the checkpoint has its own classifier (output.weight differs from tok_embeddings.weight) "
                             "but the model ties them: build it with ModelArgs(tie_embeddings=False)")
        state_dict["output.weight"] = emb  # some exporters keep only the embedding
    if not model.params.tie_embeddings and out is None:
        raise ValueError("the model has its own classifier but the checkpoint has no output.weight: "
                         "build it with ModelArgs(tie_embeddings=True)")
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.startswith("value_head.")]
    unexpected = [k for k in unexpected if not k.startswith("value_head.")]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")


def model_from_checkpoint(checkpoint, value_head=False):
    """The model of a checkpoint dict with its weights, in eval mode: a Transformer, or with value_head a
    TransformerWithValueHead (the checkpoint's value head when it has one, else a freshly initialised one)."""
    model = (TransformerWithValueHead if value_head else Transformer)(model_args_from_checkpoint(checkpoint))
    load_model_state(model, checkpoint["model"])
    return model.eval()
