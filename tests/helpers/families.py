"""Tiny random models of every backbone family clipqa supports, built from their configs and saved with
save_pretrained beside their own tokenizer or image processor, as a hub download would hold them (offline, a second
or two each). Widths differ between the towers on purpose, so the mapper must map."""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizerFast,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    DistilBertConfig,
    DistilBertModel,
    DistilBertTokenizerFast,
    RobertaConfig,
    RobertaModel,
    RobertaTokenizerFast,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from clipqa.data.demo import COLORS, PLACES, SHAPES

VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
WORDPIECE = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BPE = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's order: <pad> is 1, so its positions start at 2


def corpus() -> list[str]:
    """The demo's words: every answer is one word of these, so the vocab head can name it."""
    words = [*SHAPES, *COLORS, *PLACES, "one", "two", "three", "four"]
    return [" ".join(words), *words, "what is the color of the circle in the kitchen", "how many squares are there"]


def wordpiece(cls):
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=300, special_tokens=WORDPIECE))
    tok.decoder = decoders.WordPiece()
    ids = {t: tok.token_to_id(t) for t in ("[CLS]", "[SEP]")}
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])]
    )
    names = dict(unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    return cls(tokenizer_object=tok, **names)


def byte_bpe() -> RobertaTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=BPE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>"))
    )
    return RobertaTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
    )  # fmt: skip


def text_folder(family: str, root: Path) -> Path:
    """``distilbert`` | ``bert`` | ``roberta``: the model and its tokenizer in ``root/<family>``."""
    folder = root / family
    if family == "distilbert":
        tok = wordpiece(DistilBertTokenizerFast)
        model = DistilBertModel(DistilBertConfig(vocab_size=len(tok), dim=32, hidden_dim=64, n_layers=2, n_heads=4))
    elif family == "bert":
        tok = wordpiece(BertTokenizerFast)
        model = BertModel(BertConfig(vocab_size=len(tok), max_position_embeddings=160, **TEXT))
    else:
        tok = byte_bpe()
        config = RobertaConfig(vocab_size=len(tok), max_position_embeddings=162, pad_token_id=1, **TEXT)
        model = RobertaModel(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def vision_folder(family: str, root: Path) -> Path:
    """``clip`` (a whole two-tower CLIP model, as openai/clip-* are) | ``siglip`` (a SigLIP vision tower, no CLS)."""
    folder = root / family
    if family == "clip":
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
        CLIPModel(
            CLIPConfig(text_config=text, vision_config={**VISION, "patch_size": 8}, projection_dim=16)
        ).save_pretrained(folder)
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    else:
        SiglipVisionModel(SiglipVisionConfig(**VISION, patch_size=8)).save_pretrained(folder)  # 4 x 4 = 16 patches
        SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
