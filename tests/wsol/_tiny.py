"""The tiny training config the harness tests share (small CNN, 32 px synthetic data)."""
from cream_wsol.train import TrainConfig

IMAGE = 32


def tiny_cfg(data, out, *, seed: int = 3, **kw) -> TrainConfig:
    """A 2-epoch small-CNN config on ``data`` = (data_root, metadata_root) writing to ``out``."""
    base = dict(dataset="synthetic", data_root=str(data[0]), metadata_root=str(data[1]), arch="small",
                model_kwargs={"width": 8}, image_size=IMAGE, batch_size=8, lr=0.01, epochs=2, lr_step=1,
                seed=seed, out_dir=str(out), progress=False)
    base.update(kw)
    return TrainConfig(**base)


def assert_same_weights(a: dict, b: dict) -> None:
    """Two training checkpoints hold bit-identical model, embeddings and SGD momentum."""
    import torch

    for part in ("model", "embeddings"):
        assert a[part].keys() == b[part].keys()
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
