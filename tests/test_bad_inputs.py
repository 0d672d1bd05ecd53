"""Bad input gets a clear error that names the problem."""
import pytest
import torch

from blip2_fast.models.blip2 import Blip2ForConditionalGeneration
from blip2_fast.testing import make_tiny_folder, random_pixels


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    make_tiny_folder(str(folder), with_processor=False)
    return Blip2ForConditionalGeneration.from_pretrained(str(folder))


@pytest.mark.parametrize("pixels,match", [
    (torch.randn(1, 3, 32, 32), "expects 28x28"),
    (torch.randn(1, 1, 28, 28), r"\(batch, 3, height, width\)"),
    (torch.randn(3, 28, 28), r"\(batch, 3, height, width\)"),
    (torch.randn(0, 3, 28, 28), "empty batch"),
    (torch.full((1, 3, 28, 28), float("nan")), "NaN"),
    (torch.zeros(1, 3, 28, 28, dtype=torch.long), "floating point"),
], ids=["size", "channels", "rank", "empty", "nan", "dtype"])
def test_bad_pixels(model, pixels, match):
    with pytest.raises((ValueError, TypeError), match=match):
        model.generate(pixels, max_new_tokens=2)
    with pytest.raises((ValueError, TypeError), match=match):
        model.get_qformer_features(pixels)


def test_prompt_longer_than_context(model):
    too_long = torch.full((1, model.config.text.max_position_embeddings + 1), 5)
    with pytest.raises(ValueError, match="context"):
        model.generate(random_pixels(1), too_long, max_new_tokens=2)
    fits = torch.full((1, model.config.text.max_position_embeddings - model.config.num_query_tokens - 2), 5)
    with pytest.raises(ValueError, match="context"):  # fits alone, not with the new tokens
        model.generate(random_pixels(1), fits, max_new_tokens=10)


def test_wrong_number_of_placeholders(model):
    tok = model.config.image_token_index
    ids = torch.tensor([[tok] * (model.config.num_query_tokens - 1) + [2, 5]])
    with pytest.raises(ValueError, match="image tokens"):
        model(random_pixels(1), ids)


def test_batch_mismatch_and_mask_shape(model):
    ids = torch.tensor([[2, 5, 6]] * 2)
    with pytest.raises(ValueError, match="batch=1"):
        model(random_pixels(1), ids)
    with pytest.raises(ValueError, match="attention_mask"):
        model(random_pixels(1), ids[:1], torch.ones(1, 5, dtype=torch.long))


def test_unknown_generate_argument(model):
    with pytest.raises((TypeError, ValueError), match="num_beam"):
        model.generate(random_pixels(1), max_new_tokens=2, num_beam=3)
