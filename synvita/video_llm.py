"""The video LLM f(V, t) of §3: found by hub id or folder in seconds, loaded with transformers (with
shared_prefix_attention registered for Eq. (1)'s fast forward), and a LoRA adapter checked onto it."""
import functools
import logging
import os
import re
import warnings

import torch

from synvita.runs import UserError

DEFAULT_MODEL = "LanguageBind/Video-LLaVA-7B-hf"  # the paper's Video-LLaVA, as transformers ships it


@functools.lru_cache(maxsize=None)  # one lookup per process: 01 asks for its settings, tokenizer and weights
def resolve_model(name_or_path, flag="--model"):
    """What to load for a model flag, found in seconds or refused in one line (UserError).

    A folder that exists is loaded as it is. A value that names a folder (an absolute path, ./, ../,
    ~, a second '/', or a first part that is a folder here, as in runs/tiny-model) but does not exist
    is refused. A hub id ('org/name') is looked up once, with a short timeout: a mistyped id is
    refused; with no network, or with HF_HUB_OFFLINE=1, it loads from the Hugging Face cache, or is
    refused with what to do. (transformers alone retries an unreachable hub for ~2.5 minutes.)"""
    if os.path.exists(name_or_path):
        return name_or_path
    first = name_or_path.split("/")[0]
    if name_or_path.startswith((os.sep, ".", "~")) or name_or_path.count("/") > 1 or os.path.isdir(first):
        raise UserError(f"{flag} {name_or_path}: no such folder (a hub id has the form org/name)")
    import huggingface_hub
    from huggingface_hub.constants import HF_HUB_OFFLINE
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    reason = "HF_HUB_OFFLINE=1 is set"
    if not HF_HUB_OFFLINE:
        try:  # one request, no retries: a typo or a missing network shows in seconds
            huggingface_hub.model_info(name_or_path, timeout=10)
            return name_or_path  # on the hub: transformers / diffusers download or use their cache
        except RepositoryNotFoundError:
            raise UserError(f"{flag} {name_or_path}: no such folder here and no such model on the hub "
                            f"(a typo? a private model needs `hf auth login`)") from None
        except Exception as e:  # no network, a proxy, a hub outage: try the cache
            reason = f"the hub cannot be reached ({type(e).__name__}: {str(e)[:80]})"
    try:  # a complete earlier download: load its folder, so that nothing asks the network again
        return huggingface_hub.snapshot_download(name_or_path, local_files_only=True)
    except LocalEntryNotFoundError:
        raise UserError(f"{flag} {name_or_path}: not a folder here, not in the Hugging Face cache, and "
                        f"{reason}: download it where there is a network (`hf download {name_or_path}`) "
                        f"or give its local folder") from None

def not_a_missing_backend(record):
    """A logging filter: transformers 5 says "Requested torchvision backend is not available. Falling
    back to pil backend" for a model whose image processor exists only for PIL (Video-LLaVA), although
    torchvision is installed (its video processors need it anyway): nothing is missing, so that line goes."""
    return "Falling back to pil backend" not in record.getMessage()

def load_video_llm(name_or_path=DEFAULT_MODEL, dtype=None, device="cpu"):
    """A transformers video LLM and its processor, from a hub id or a local directory, with
    shared_prefix_attention (plain sdpa wherever answer_states does not ask for it).
    dtype defaults to bfloat16 on GPU and float32 on CPU."""
    from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForImageTextToText, AutoProcessor
    from transformers.masking_utils import sdpa_mask
    from synvita.shared_prefix import shared_prefix_attention
    AttentionInterface.register("sdpa_shared_prefix", shared_prefix_attention)
    AttentionMaskInterface.register("sdpa_shared_prefix", sdpa_mask)  # 2-D masks become sdpa's masks
    name_or_path = resolve_model(name_or_path, "--model")  # a typo or no network: seconds, one line
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)  # bf16 as in §6
    logging.getLogger("transformers.models.auto.image_processing_auto").addFilter(not_a_missing_backend)
    if is_mplug_owl(name_or_path):  # the paper's second model: in no transformers release, rebuilt in synvita/
        from synvita import mplug_owl, mplug_owl_processor
        model = mplug_owl.load(name_or_path, dtype, attn_implementation="sdpa_shared_prefix")
        processor = mplug_owl_processor.MplugOwlProcessor.from_pretrained(name_or_path, model.config.num_query_tokens + 1)
        return model.to(device).eval(), processor
    processor = AutoProcessor.from_pretrained(name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype,
                                                        attn_implementation="sdpa_shared_prefix")
    return model.to(device).eval(), processor


def is_mplug_owl(path):
    """Whether a model folder holds mPLUG-Owl (its config.json's model_type "mplug-owl")."""
    import json
    config = os.path.join(path, "config.json")
    return os.path.exists(config) and json.load(open(config, encoding="utf-8")).get("model_type") == "mplug-owl"

def load_adapter(model, path, base=""):
    """A LoRA adapter (03_train.py's <out_dir>/adapter) on `model` with peft, checked: every LoRA
    tensor of the file must land on a LoRA weight of the model and every LoRA weight must come from
    the file, else an error names the adapter and the base (peft itself only warns, and an adapter of
    another base model then scores as the bare base)."""
    from peft import PeftModel
    from peft.utils import load_peft_weights
    if unwrap(model).config.model_type == "mplug-owl" and not os.path.exists(os.path.join(path, "adapter_config.json")):
        from synvita import mplug_owl  # VideoCon's Owl-Con or the released mPLUG checkpoints: a whole state dict
        try:
            return mplug_owl.load_owl_con(model, path)
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(f"--adapter {path}: {str(e).splitlines()[0]}") from None
    with warnings.catch_warnings():  # peft 0.21 itself reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        model = PeftModel.from_pretrained(model, path).eval()
    saved = load_peft_weights(path, device="cpu")  # the file's tensors, by their saved names
    # the loaded model's LoRA tensors under the same names (peft inserts the adapter's name, "default")
    ours = {re.sub(r"\.default(?=\.)", "", k, count=1): v for k, v in model.state_dict().items() if "lora_" in k}
    bad = sorted(set(saved) ^ set(ours)) or [k for k in saved if not torch.equal(saved[k], ours[k].cpu())]
    if bad:
        raise UserError(f"--adapter {path}: {len(bad)} LoRA tensor(s) do not fit the base model {base} (e.g. "
                         f"{bad[0]}); was it trained on another one?")
    return model

def unwrap(model):
    """The transformers model inside a (possibly PEFT- or DDP-wrapped) model."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model

def max_positions(model):
    """The most positions the model's LLM was trained on (its text config's max_position_embeddings;
    Video-LLaVA-7B: 4,096). A longer prompt still runs, on positions the model never saw: its scores
    would be silently wrong, so the stages leave such a pair out and name it (prompt_lengths)."""
    config = unwrap(model).config
    return getattr(getattr(config, "text_config", config), "max_position_embeddings", None) or float("inf")
