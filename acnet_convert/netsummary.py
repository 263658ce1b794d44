"""Conv layers, parameters and multiply-accumulates of a PyTorch net: export's before/after."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["NetSummary", "summarise_net"]


@dataclass(frozen=True)
class NetSummary:
    """Conv layers, parameters and multiply-accumulates (one input) of a PyTorch net."""

    conv_layers: int
    params: int
    macs: int

    def as_json(self) -> dict[str, int]:
        return {"conv_layers": self.conv_layers, "params": self.params, "macs": self.macs}


def summarise_net(
    net: nn.Module, input_shape: tuple[int, ...], batch: int = 1, what: str = "the net"
) -> NetSummary:
    """Count ``net``'s conv layers and parameters, and its MACs per input of ``input_shape``.

    A conv's MACs are ``output elements * (in_channels / groups) * kh * kw``, a
    linear layer's ``output elements * in_features``; BN, activations and
    pooling are not counted (what MAC tables usually list). The forward runs on
    ``batch`` zero inputs (a net may accept only the batch it is exported with).

    Raises:
        ACNetConvertError: the forward fails (named with ``what``).
    """
    import torch
    from torch import nn

    from acnet_convert.verify.network import _run

    macs = 0

    def conv_hook(module: nn.Module, _: Any, output: torch.Tensor) -> None:
        nonlocal macs
        assert isinstance(module, nn.Conv2d)
        kh, kw = module.kernel_size
        macs += output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Module, _: Any, output: torch.Tensor) -> None:
        nonlocal macs
        assert isinstance(module, nn.Linear)
        macs += output.numel() * module.in_features

    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    hooks = [m.register_forward_hook(conv_hook) for m in convs]
    hooks += [
        m.register_forward_hook(linear_hook) for m in net.modules() if isinstance(m, nn.Linear)
    ]
    try:
        with torch.inference_mode():
            dtype = next((p.dtype for p in net.parameters()), torch.float32)
            _run(net, torch.zeros((batch, *input_shape), dtype=dtype), what)
    finally:
        for hook in hooks:
            hook.remove()
    return NetSummary(len(convs), sum(p.numel() for p in net.parameters()), macs // batch)
