"""Penultimate-layer embeddings of a split and their 2-D maps (t-SNE, UMAP).

The model is used only through ``embed(x) -> (B, D)``; the maps are seeded, so the
same run and split give the same pictures.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pneumoscope.fsio import atomic_write_bytes, atomic_write_csv
from pneumoscope.inference import inference_precision
from pneumoscope.models.classifier import Classifier, images_to_input
from pneumoscope.models.precision import autocast
from pneumoscope.tasks import CLASSES, p_pneumonia


@torch.no_grad()
def extract_embeddings(
    model: torch.nn.Module,
    images: np.ndarray,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    show_progress: bool = False,
) -> np.ndarray:
    """float32 (N, D) embeddings of a uint8 image array (N, S, S), batch by batch."""
    return embed_and_predict(model, images, batch_size, device, show_progress, with_probs=False)[0]


@torch.no_grad()
def embed_and_predict(
    model: torch.nn.Module,
    images: np.ndarray,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    show_progress: bool = False,
    with_probs: bool = True,
    class_probs: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Embeddings (N, D) and p(pneumonia) (N,) of a uint8 image array (N, S, S); with
    class_probs, the class probabilities (N, C) instead (pneumoscope.tasks.p_pneumonia).

    A plain Classifier gives both from one backbone pass (in eval mode its forward() is
    head(embed(x)), op for op); any other model (an ensemble, TTA wrapper) is asked
    through its own forward() and embed(), two passes. Precision and memory format are
    those of inference.predict_probs, so the probabilities are the ones `evaluate` and
    `predict` report (tests/report check that they are equal)."""
    model.eval()
    one_pass = isinstance(model, Classifier)
    dev = torch.device(device)
    precision = inference_precision(dev)
    embs, probs = [], []
    starts = range(0, len(images), batch_size)
    desc = "predict + embed" if with_probs else "embed"
    for start in tqdm(starts, desc=desc, unit="batch", disable=not show_progress):
        x = images_to_input(images[start : start + batch_size]).to(dev)
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast(dev, precision):
            emb = model.embed(x)
            logits = (
                (model.head(model.dropout(emb)) if one_pass else model(x)) if with_probs else None
            )
        embs.append(emb.float().cpu())
        if with_probs:
            probs.append(torch.softmax(logits.float(), dim=1).cpu())
    if not embs:
        return np.empty((0, 0), dtype=np.float32), np.empty(
            0, dtype=np.float32
        ) if with_probs else None
    if not with_probs:
        return torch.cat(embs).numpy(), None
    probs = torch.cat(probs).numpy()
    return torch.cat(embs).numpy(), probs if class_probs else p_pneumonia(probs)


def _check_points(embeddings: np.ndarray, method: str) -> None:
    if embeddings.ndim != 2 or len(embeddings) < 4:
        raise ValueError(
            f"{method}: needs at least 4 embeddings (N, D), got shape {embeddings.shape}"
        )


def tsne_2d(embeddings: np.ndarray, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """t-SNE (scikit-learn, PCA init, seeded) of (N, D) -> float32 (N, 2).

    Perplexity is capped below N/3 so that small splits work too."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    _check_points(embeddings, "t-SNE")
    n = len(embeddings)
    # PCA to 50 dims first: the usual t-SNE practice; it denoises and is much faster.
    x = embeddings.astype(np.float64)
    if x.shape[1] > 50 and n > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    perplexity = float(min(perplexity, max(2.0, (n - 1) / 3.0)))
    tsne = TSNE(
        n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed
    )
    return tsne.fit_transform(x).astype(np.float32)


def umap_2d(
    embeddings: np.ndarray, seed: int = 0, n_neighbors: int = 15, show_progress: bool = False
) -> np.ndarray:
    """UMAP (umap-learn, seeded) of (N, D) -> float32 (N, 2), with a tqdm bar over its
    optimisation epochs."""
    import umap

    _check_points(embeddings, "UMAP")
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=int(min(n_neighbors, len(embeddings) - 1)),
        random_state=seed,
        tqdm_kwds={"disable": not show_progress, "desc": "UMAP"},
    )
    with warnings.catch_warnings():
        # A seed forces single-threaded UMAP; it says so on every call. We want the seed.
        warnings.filterwarnings("ignore", message=".*n_jobs value.*overridden.*")
        points = reducer.fit_transform(embeddings.astype(np.float32))
    return np.asarray(points, dtype=np.float32)


def save_embeddings(
    out_dir: str | Path,
    embeddings: np.ndarray,
    paths: list[str],
    labels: np.ndarray,
    probs: np.ndarray,
    threshold: float,
    maps: dict[str, np.ndarray],
) -> tuple[Path, Path]:
    """embeddings.npy (N, D) float32 and embeddings_meta.csv, one row per row of the array:
    index, path, label, class, p_pneumonia, predicted, correct and the 2-D map coordinates."""
    out_dir = Path(out_dir)
    npy = out_dir / "embeddings.npy"
    atomic_write_bytes(npy, _npy_bytes(embeddings.astype(np.float32)))
    names = sorted(maps)
    header = ["index", "path", "label", "class", "p_pneumonia", "predicted", "correct"]
    header += [f"{name}_{axis}" for name in names for axis in ("x", "y")]
    rows = []
    for i, (path, label, p) in enumerate(zip(paths, labels, probs)):
        predicted = int(p >= threshold)
        row = [
            i,
            path,
            int(label),
            CLASSES[int(label)],
            f"{p:.6f}",
            predicted,
            int(predicted == label),
        ]
        row += [f"{maps[name][i, axis]:.5f}" for name in names for axis in (0, 1)]
        rows.append(row)
    meta = out_dir / "embeddings_meta.csv"
    atomic_write_csv(meta, header, rows)
    return npy, meta


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
