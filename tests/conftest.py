import os

# One intra-op thread per test process (and the processes the tests start), unless the caller
# sets another count: the tests' tensors are small, and on a 2-core machine torch's thread pool
# cost more than it gained (tests/test_mislabeled.py and test_methods.py: 61 s with 2 threads,
# 42 s with 1); the suite runs two test processes side by side instead (pytest -n 2).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests never reach a model hub: every model is built from a config or shipped in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def random_gradients(n: int, widths: dict[str, int], seed: int, dtype=torch.float64, scale=None):
    """Random per-block gradients with uneven row norms (like real per-example gradients)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, d) in enumerate(widths.items()):
        row_scale = torch.rand(n, 1, generator=g, dtype=torch.float64) * 2 + 0.1
        block_scale = (scale or 1.0) * 10.0 ** (i % 3 - 1)
        out[name] = (
            torch.randn(n, d, generator=g, dtype=torch.float64) * row_scale * block_scale
        ).to(dtype)
    return out


def any_estimator(method: str, widths: dict[str, int], **kwargs):
    """``datainf.methods.estimator(method, **kwargs)`` with what a method needs beyond the
    gradients: for ``less``, second moments that differ across entries (so that the
    preconditioner matters), (j + 1) * 1e-3 for entry j of each block."""
    from datainf.methods import METHODS, estimator

    if METHODS[method].second_moments:
        kwargs["second_moments"] = {name: (torch.arange(d) + 1.0) * 1e-3
                                    for name, d in widths.items()}
    return estimator(method, **kwargs)


@pytest.fixture
def grads():
    """Training and test gradients with blocks narrower and wider than n = 40."""
    widths = {"layer.0.lora_A": 6, "layer.0.lora_B": 64, "head": 17}
    return random_gradients(40, widths, seed=1), random_gradients(7, widths, seed=2)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Folder of a 2-layer BERT classifier with MiniLM's tokenizer, saved like any HF checkpoint
    (for runs of the ``datainf`` command that take seconds)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from datainf.models.hf import minilm_path

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def csv_file(tmp_path):
    """train.csv: 60 short texts of three classes (columns text, label)."""
    import pandas as pd
    from cli_helpers import make_texts

    texts, labels = make_texts(60, seed=1)
    path = tmp_path / "train.csv"
    pd.DataFrame({"text": texts, "label": labels}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    """Folder of a 2-layer Llama causal LM with SmolLM2's tokenizer and chat template (read
    from the shipped GGUF file), saved like any HF checkpoint: explain-generation in seconds."""
    from datainf.models.tiny import tiny_chat_model

    return str(tiny_chat_model(tmp_path_factory.mktemp("chat") / "tiny-llama-chat"))


@pytest.fixture(scope="session")
def tiny_digit_pipeline(tmp_path_factory):
    """Folder of a digit pipeline with a 2-level UNet of random weights on 8 x 8 images and the
    shipped MiniLM as text encoder: explain-image in seconds."""
    from datainf.models.tiny import tiny_digit_pipeline

    return str(tiny_digit_pipeline(tmp_path_factory.mktemp("digits") / "tiny-digits"))
