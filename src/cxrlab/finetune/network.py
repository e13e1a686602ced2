"""The fine-tuned network kept beside the model (``finetuned.safetensors``): its torch weights and the exact head
fused into model.onnx, so that ``cxrlab adapt`` can rebuild it, re-estimate its BatchNorm statistics on a new
site's images and export it again. Never pickled: safetensors holds only named arrays."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..errors import ModelDirError
from .modules import channels_last, make_intensity, resize_to, to_tensor, torch_module, with_tta, wrap

NETWORK_FILE = "finetuned.safetensors"
_HEAD = ("head.coef", "head.intercept", "head.temperature")


def network_arrays(module, coef: np.ndarray, intercept: np.ndarray, temperature: float) -> bytes:
    """safetensors bytes: the wrapped network's state (``net.`` names) and the fused head."""
    from safetensors.numpy import save

    arrays = {f"net.{k}": np.ascontiguousarray(v.detach().cpu().numpy()) for k, v in module.state_dict().items()}
    arrays.update({"head.coef": np.asarray(coef, np.float32), "head.intercept": np.asarray(intercept, np.float32),
                   "head.temperature": np.asarray([temperature], np.float32)})
    return save(arrays)


def rebuild_network(info: dict, data: bytes, where: str):
    """(torch module in eval mode, coef, intercept, temperature) of a fine-tuned model's saved network."""
    from ..backbones import create_backbone, weights_path
    from ..modeldir import parse_arrays

    torch = torch_module()
    ft = info.get("fine_tune") or {}
    arrays = parse_arrays(data, where)
    if any(k not in arrays for k in _HEAD):
        raise ModelDirError(f"{where}: the fine-tuned head is missing ({', '.join(_HEAD)})")
    base = create_backbone(ft["base_backbone"])
    size = int(ft["preprocessing"]["input_size"])
    spec = replace(base.spec, input_size=size)
    module = wrap(spec.builder(spec, weights_path(base.spec)), make_intensity(ft["options"]["intensity"], size))
    state = {k[4:]: torch.from_numpy(v.copy()) for k, v in arrays.items() if k.startswith("net.")}
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelDirError(f"{where}: the saved network does not fit {ft['base_backbone']} ({exc})") from None
    module.eval()
    return module, arrays["head.coef"], arrays["head.intercept"], float(arrays["head.temperature"][0])


def reestimate_batchnorm(module, images: np.ndarray, size: int, batch: int = 32) -> int:
    """Label-free site adaptation (AdaBN): every BatchNorm layer's running mean and variance replaced by their
    average over ``images`` ((N, H, W) uint8, one forward pass in training mode, no weight changes). Returns the
    number of layers re-estimated."""
    torch = torch_module()
    bn = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bn:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over all batches, not an exponential one
    module.eval()
    for m in bn:
        m.train()
    X = to_tensor(images)
    with torch.no_grad():
        for i in range(0, len(X), batch):
            module(channels_last(resize_to(X[i : i + batch], size)))
    module.eval()
    return len(bn)


def export_network(module, info: dict, outputs: tuple[str, ...]) -> bytes:
    """The backbone graph of a fine-tuned model (with its test-time augmentation), as training exported it."""
    from .stage import export_onnx

    ft = info["fine_tune"]
    size = int(ft["preprocessing"]["input_size"])
    options = ft["options"]
    exported = with_tta(module, size, int(options["tta_views"])) if options.get("tta") else module
    return export_onnx(exported, size, outputs)
