"""Tiny randomly initialised checkpoints, saved with save_pretrained like real ones."""

from __future__ import annotations

from pathlib import Path

import torch

from batch_classify.core.labels import imagenet_classes


def _imagenet_id2label(background: bool = False) -> dict[int, str]:
    names = list(imagenet_classes()[1])
    if background:
        names = ["background", *names]
    return dict(enumerate(names))


def _spread_head(model: torch.nn.Module) -> torch.nn.Module:
    """Random init leaves some heads at zero: give the classifier weights a real spread."""
    torch.nn.init.normal_(model.classifier.weight, std=1.0)
    return model


def _randomise_convs(model: torch.nn.Module) -> torch.nn.Module:
    """Some checkpoints' default init (near-zero BatchNorm scales) zeroes a tiny net's features."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight)
        elif isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(module.weight)
    return model


def save_tiny_beit(folder: Path) -> Path:
    from transformers import BeitConfig, BeitForImageClassification, BeitImageProcessor

    torch.manual_seed(0)
    config = BeitConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, use_mean_pooling=True,
                        id2label=_imagenet_id2label())
    _spread_head(BeitForImageClassification(config)).save_pretrained(folder)
    BeitImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False,
                       image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return folder


def save_tiny_mobilenet_v1(folder: Path) -> Path:
    """1001 outputs with 'background' first, like google/mobilenet_v1_1.0_224."""
    from transformers import (
        MobileNetV1Config,
        MobileNetV1ForImageClassification,
        MobileNetV1ImageProcessor,
    )

    torch.manual_seed(0)
    # A wider init than the default: at 0.02 this shallow net's logits vanish to ~1e-34.
    config = MobileNetV1Config(image_size=32, depth_multiplier=0.25, initializer_range=0.3,
                               id2label=_imagenet_id2label(background=True))
    MobileNetV1ForImageClassification(config).save_pretrained(folder)
    MobileNetV1ImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                              image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return folder


def save_tiny_efficientnet(folder: Path) -> Path:
    from transformers import (
        EfficientNetConfig,
        EfficientNetForImageClassification,
        EfficientNetImageProcessor,
    )

    torch.manual_seed(0)
    config = EfficientNetConfig(image_size=32, width_coefficient=0.25, depth_coefficient=0.25,
                                hidden_dim=320, id2label=_imagenet_id2label())
    _randomise_convs(EfficientNetForImageClassification(config)).save_pretrained(folder)
    EfficientNetImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


BUILDERS = {
    "beit": save_tiny_beit,
    "mobilenet_v1": save_tiny_mobilenet_v1,
    "efficientnet": save_tiny_efficientnet,
}


def save_tiny_classifier(folder: Path, id2label: dict[int, str]) -> Path:
    """A tiny MobileNetV1 with the given classes (for label-space tests)."""
    from transformers import MobileNetV1Config, MobileNetV1ForImageClassification, MobileNetV1ImageProcessor

    torch.manual_seed(0)
    config = MobileNetV1Config(image_size=32, depth_multiplier=0.25, initializer_range=0.3,
                               id2label=id2label)
    MobileNetV1ForImageClassification(config).save_pretrained(folder)
    MobileNetV1ImageProcessor(size={"shortest_edge": 36},
                              crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


ZERO_SHOT_WORDS = ("a photo of the an this is kind picture tench tabby cat warplane dog car tree "
                   "missile sunglasses plane fish")


def _word_tokenizer(model_max_length: int, with_attention_mask: bool):
    """A word-level tokenizer built offline: <bos> words <eos>, '.' and ',' as words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<bos>", "<eos>", ".", ",", *ZERO_SHOT_WORDS.split()]
    vocab = {word: i for i, word in enumerate(dict.fromkeys(words))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    names = ["input_ids", "attention_mask"] if with_attention_mask else ["input_ids"]
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>", model_max_length=model_max_length,
                                   model_input_names=names), len(vocab)


def _tiny_towers(vocab_size: int, max_positions: int) -> tuple[dict, dict]:
    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=max_positions,
                pad_token_id=0, bos_token_id=2, eos_token_id=3)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    return text, vision


def save_tiny_clip(folder: Path) -> Path:
    """CLIPModel + a word tokenizer + CLIPImageProcessor (shortest edge 36, crop 32, bicubic)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    tokenizer, vocab_size = _word_tokenizer(77, with_attention_mask=True)
    text, vision = _tiny_towers(vocab_size, 77)
    config = CLIPConfig(text_config=text, vision_config={**vision, "projection_dim": 16}, projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(folder)
    return folder


def save_tiny_siglip(folder: Path) -> Path:
    """SiglipModel + a word tokenizer (no attention mask, as SigLIP's) + SiglipImageProcessor;
    text positions 64, the length the pipeline pads SigLIP text to."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    torch.manual_seed(0)
    tokenizer, vocab_size = _word_tokenizer(64, with_attention_mask=False)
    text, vision = _tiny_towers(vocab_size, 64)
    config = SiglipConfig(text_config={**text, "projection_size": 32}, vision_config=vision)
    SiglipModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
