"""Feature extraction against transformers' Blip2Model, Blip2VisionModelWithProjection and
Blip2TextModelWithProjection on tiny random models (fp32, <= 1e-4)."""
import pytest
import torch
import transformers as T

from blip2_fast.loading import CheckpointError
from blip2_fast.models import features as F
from blip2_fast.models.retrieval_heads import Blip2ForImageTextRetrieval
from blip2_fast.testing import hf_config, random_pixels, randomize_

Q = 4


def _saved(cls, folder, seed, **kw):
    model = randomize_(cls(hf_config(num_query_tokens=Q, **kw)), seed).eval()
    model.save_pretrained(folder)
    return model


def _texts(n=3, width=6, seed=0):
    ids = torch.randint(4, 60, (n, width), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    mask[2, 1:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def retrieval_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("itm"))
    return _saved(T.Blip2ForImageTextRetrieval, folder, 0, qformer_heads=5, cross_attention_frequency=1), folder


def _close(a, b, what):
    assert a.shape == b.shape, what
    assert (a - b).abs().max() <= 1e-4, what


@pytest.mark.parametrize("own_folder", [True, False], ids=["own-folder", "retrieval-folder"])
def test_vision_model_with_projection(retrieval_folder, tmp_path, own_folder):
    folder = retrieval_folder[1]
    if own_folder:
        folder = str(tmp_path)
        _saved(T.Blip2VisionModelWithProjection, folder, 1)
    ref_model = T.Blip2VisionModelWithProjection.from_pretrained(folder).eval()
    ours = F.Blip2VisionModelWithProjection.from_pretrained(folder)
    assert not hasattr(ours, "embeddings")  # the text tower of a retrieval folder is not kept
    pixels = random_pixels(3, seed=1)
    with torch.no_grad():
        ref, out = ref_model(pixel_values=pixels), ours(pixels)
    _close(ref.image_embeds, out.image_embeds, "image_embeds")
    _close(ref.last_hidden_state, out.last_hidden_state, "last_hidden_state")
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(3, Q))


@pytest.mark.parametrize("own_folder", [True, False], ids=["own-folder", "retrieval-folder"])
def test_text_model_with_projection(retrieval_folder, tmp_path, own_folder):
    folder = retrieval_folder[1]
    if own_folder:
        folder = str(tmp_path)
        _saved(T.Blip2TextModelWithProjection, folder, 2)
    ref_model = T.Blip2TextModelWithProjection.from_pretrained(folder).eval()
    ours = F.Blip2TextModelWithProjection.from_pretrained(folder)
    assert not hasattr(ours, "vision_model")
    ids, mask = _texts()
    with torch.no_grad():
        ref, out = ref_model(input_ids=ids, attention_mask=mask), ours(ids, mask)
    real = mask.bool()
    _close(ref.text_embeds[real], out.text_embeds[real], "text_embeds")
    _close(ref.last_hidden_state[real], out.last_hidden_state[real], "last_hidden_state")
    # batching: row 1 alone, its padding trimmed, gives the same features
    alone = ours(ids[1:2, :3], mask[1:2, :3]).text_embeds
    assert (alone - out.text_embeds[1:2, :3]).abs().max() <= 1e-5


def test_projection_models_refuse_other_folders(tmp_path):
    _saved(T.Blip2ForConditionalGeneration, str(tmp_path), 3)
    with pytest.raises(CheckpointError, match="vision_projection"):
        F.Blip2VisionModelWithProjection.from_pretrained(str(tmp_path))


def test_blip2_model_features(tmp_path):
    hf = _saved(T.Blip2Model, str(tmp_path), 4, vision_heads=3)
    ours = F.Blip2Model.from_pretrained(str(tmp_path))
    pixels, (ids, mask) = random_pixels(2, seed=5), _texts(seed=1)
    with torch.no_grad():
        ref, out = hf.get_image_features(pixel_values=pixels), ours.get_image_features(pixels)
        _close(ref.last_hidden_state, out.last_hidden_state, "vision last_hidden_state")
        _close(ref.pooler_output, out.pooler_output, "vision pooler_output")
        _close(hf.get_qformer_features(pixel_values=pixels), ours.get_qformer_features(pixels), "qformer")
        ref_t = hf.get_text_features(input_ids=ids, attention_mask=mask).last_hidden_state
        out_t = ours.get_text_features(ids, mask)
    real = mask.bool()
    _close(ref_t[real], out_t[real], "text features")


def test_multimodal_features_are_itm_query_outputs(retrieval_folder):
    hf, folder = retrieval_folder
    ours = Blip2ForImageTextRetrieval.from_pretrained(folder)
    pixels, (ids, mask) = random_pixels(3, seed=6), _texts(seed=2)
    with torch.no_grad():
        ref = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        out = F.multimodal_features(ours, pixels, ids, mask)
        _close(ref.text_model_output.last_hidden_state[:, :Q], out, "multimodal")
        # the text changes the query outputs (bidirectional mode): not the image-only features
        assert (out - ours.query_output(ours.vision(pixels))).abs().max() > 1e-3
        with pytest.raises(ValueError, match="pairs"):
            F.multimodal_features(ours, pixels[:2], ids, mask)


def test_text_model_reads_no_vision_tensor_from_a_retrieval_folder(retrieval_folder, monkeypatch):
    """skip_unused leaves the other tower on disk: loading the text model reads no ViT tensor."""
    import blip2_fast.loading as loading
    read = []
    real = loading.iter_checkpoint

    def spy(files, want=None):
        for key, tensor in real(files, want):
            read.append(key)
            yield key, tensor
    monkeypatch.setattr(loading, "iter_checkpoint", spy)
    F.Blip2TextModelWithProjection.from_pretrained(retrieval_folder[1])
    assert read and not any(k.startswith(("vision_model.", "vision_projection.", "itm_head.")) for k in read)
