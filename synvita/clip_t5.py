"""The ensemble's members (§4): each of --models found in seconds before any loads, and loaded, one at a
time; every family by transformers' Auto classes but CLIP-FlanT5 (VQAScore's own model, Lin et al.
2024), which transformers does not ship: it is rebuilt here from transformers' parts (T5, CLIP)."""
from types import SimpleNamespace

import torch

from synvita.runs import UserError
from synvita.video_llm import load_video_llm, resolve_model


# ---- every member found before any is loaded: a typo costs seconds, not a loaded 25 GB model --------
def find_member(model_id):
    """Where a member of --models loads from, found in seconds (video_llm.resolve_model: a typo, a missing
    folder, no network) before any member is loaded or any video read: {"path"}, and for CLIP-FlanT5 the
    two models its checkpoint names, {"tower": its CLIP vision tower, "tokenizer": Flan-T5's if it has none}."""
    from transformers import PretrainedConfig
    from transformers.utils import cached_file
    path = resolve_model(model_id, "--models")  # a folder, or a hub id found on the hub or in its cache
    try:
        config = PretrainedConfig.get_config_dict(path)[0]
    except OSError as e:  # a folder that holds no model
        raise UserError(f"--models {model_id}: not a transformers model ({str(e).splitlines()[0]})") from None
    if config.get("model_type") != "clip_t5":
        return {"path": path}  # a transformers family: its folder holds everything it loads
    # t2v_metrics reads google/flan-t5-xxl's tokenizer (the same for -xl) unless the checkpoint has one
    own = cached_file(path, "tokenizer_config.json", _raise_exceptions_for_missing_entries=False)
    return {"path": path, "tower": resolve_model(config["mm_vision_tower"], f"--models {model_id}: its mm_vision_tower"),
            "tokenizer": path if own else resolve_model("google/flan-t5-xxl", f"--models {model_id}: its tokenizer")}


def find_members(models):
    """find_member for each of --models; the members that are not there are named in ONE error, so a
    user fixes them all at once instead of one rerun per member."""
    found, missing = [], []
    for model_id in models:
        try:
            found.append(find_member(model_id))
        except UserError as e:
            missing.append(str(e))  # named together below, with every other member that is not there
    if missing:
        raise UserError("; ".join(missing))
    return found


# ---- CLIP-FlanT5 (Lin et al. 2024): FlanT5 whose encoder reads a CLIP image --------------------
# The released checkpoint's layout (t2v_metrics' CLIPT5ForConditionalGeneration): T5's own weights +
# vision_tower.vision_tower.* (a CLIPVisionModel, wrapped once) + mm_projector.{0,2}.* (mlp2x_gelu:
# Linear, GELU, Linear); config.json = T5's + mm_vision_tower, mm_projector_type, mm_vision_select_layer.
IMAGE = -200  # the image placeholder id in CLIP-FlanT5's input (t2v_metrics' value): no vocabulary id


def clip_t5_classes():
    """CLIP-FlanT5's model and processor classes, defined on first use (transformers loads lazily)."""
    from transformers import BatchFeature, CLIPVisionConfig, CLIPVisionModel, T5Config, T5ForConditionalGeneration

    class CLIPT5Config(T5Config):
        model_type = "clip_t5"  # the checkpoint's config.json names it: find_member tells the family by it

    class CLIPFlanT5(T5ForConditionalGeneration):
        config_class = CLIPT5Config  # from_pretrained reads the checkpoint's config.json into it

        def __init__(self, config):
            super().__init__(config)  # T5's encoder, decoder and LM head: the checkpoint's own weights
            kind = getattr(config, "mm_projector_type", "linear"), getattr(config, "mm_vision_select_feature", "patch")
            if kind != ("mlp2x_gelu", "patch"):
                raise UserError("CLIP-FlanT5: only the released mlp2x_gelu projector of patch features is built")
            self.vision_tower = torch.nn.Module()  # t2v_metrics' wrapper around the CLIP vision model
            self.vision_tower.vision_tower = CLIPVisionModel(CLIPVisionConfig.from_pretrained(config.mm_vision_tower))
            width = self.vision_tower.vision_tower.config.hidden_size  # CLIP ViT-L/14-336: 1024
            # CLIP's width -> T5's d_model: a patch becomes one input embedding of T5's encoder
            self.mm_projector = torch.nn.Sequential(torch.nn.Linear(width, config.d_model), torch.nn.GELU(),
                                                    torch.nn.Linear(config.d_model, config.d_model))

        def get_image_features(self, pixel_values):
            """The images' patches as T5 input embeddings (.pooler_output, as transformers' members give it)."""
            hidden = self.vision_tower.vision_tower(pixel_values, output_hidden_states=True).hidden_states
            image = self.mm_projector(hidden[self.config.mm_vision_select_layer][:, 1:])  # (n, patches, d): no CLS
            return SimpleNamespace(pooler_output=image)

        def forward(self, input_ids, pixel_values=None, mm_encoder_outputs=None, **kwargs):
            """T5 on the prompt's embeddings, the image's patches in place of its IMAGE placeholders
            (mm_encoder_outputs: the patches already encoded, vqa.given_image)."""
            image = (mm_encoder_outputs or {}).get("image") or self.get_image_features(pixel_values)
            image = image.pooler_output  # (n, patches, d)
            embeds = self.get_input_embeddings()(input_ids.clamp(min=0))  # (n, L, d)
            # the n x patches IMAGE slots, in order, take the n images' patches
            embeds = embeds.masked_scatter((input_ids == IMAGE)[..., None], image.to(embeds.dtype))
            return super().forward(inputs_embeds=embeds, **kwargs)  # decoder_input_ids: a_1..a_{k-1} (vqa.py)

    class CLIPFlanT5Processor:
        """t2v_metrics' input: CLIP preprocessing of a (padded) frame; the prompt's text on either side
        of "<image>" tokenised apart, each with its end token, and one IMAGE per patch between them."""

        def __init__(self, tokenizer, image_processor, num_patches):
            self.tokenizer, self.image_processor, self.num_patches = tokenizer, image_processor, num_patches

        def __call__(self, images, text, return_tensors="pt", **unused):
            sides = [self.tokenizer(prompt.split("<image>"))["input_ids"] for prompt in text]  # [before, after]
            rows = [before + [IMAGE] * self.num_patches + after for before, after in sides]  # ids, unpadded
            pad = self.tokenizer.pad_token_id  # T5's <pad>; attention_mask below is 0 there
            input_ids = torch.tensor([r + [pad] * (max(map(len, rows)) - len(r)) for r in rows])  # (n, L) right-padded
            pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]  # (n, 3, H, W)
            return BatchFeature({"input_ids": input_ids, "attention_mask": (input_ids != pad).long(),
                                 "pixel_values": pixels}, tensor_type=return_tensors)

    return CLIPFlanT5, CLIPFlanT5Processor


def load_member(model_id, device="cpu", found=None):
    """An ensemble member and its processor: every model by transformers' Auto classes (video_llm.
    load_video_llm) but CLIP-FlanT5 (model_type "clip_t5"), from its released checkpoint. That may lack
    the frozen vision tower's weights: they come from mm_vision_tower then, as in t2v_metrics.
    found: find_member's answer (where the member and its parts load from), looked up if not given."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPVisionModel
    found = found or find_member(model_id)  # score_ensemble passes what find_members found before any load
    if "tower" not in found:
        return load_video_llm(found["path"], device=device)
    model_class, processor_class = clip_t5_classes()
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32  # bfloat16: ~25 GB for an XXL
    tower = found["tower"]  # mm_vision_tower as found: a hub id with no network is its cached folder
    model, info = model_class.from_pretrained(found["path"], dtype=dtype, output_loading_info=True, mm_vision_tower=tower)
    missing = info["missing_keys"]  # a checkpoint saved without its frozen tower lacks vision_tower.*
    if any(k.startswith("vision_tower.") for k in missing):
        model.vision_tower.vision_tower = CLIPVisionModel.from_pretrained(tower, dtype=dtype)
    if any(not k.startswith("vision_tower.") for k in missing):
        raise UserError(f"--models {model_id}: not a CLIP-FlanT5 checkpoint, it lacks {sorted(missing)[:5]}")
    tokenizer = AutoTokenizer.from_pretrained(found["tokenizer"], config=model.config)  # its own, or Flan-T5's
    model.resize_token_embeddings(len(tokenizer))  # as t2v_metrics: T5's 32128 padded rows -> the 32100 tokens
    vision = model.vision_tower.vision_tower.config  # patches an image: (image_size / patch_size)^2, 576 at 336 px
    processor = processor_class(tokenizer, CLIPImageProcessorPil.from_pretrained(tower),
                                (vision.image_size // vision.patch_size) ** 2)  # one IMAGE slot per patch
    return model.to(device).eval(), processor

