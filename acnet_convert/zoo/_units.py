"""How upstream ACNet turns one conv unit into modules, in each of the three forms.

Upstream builds every network through a builder object (``builder.py``
``ConvBuilder`` for the baseline, ``acnet/acnet_builder.py`` ``ACNetBuilder``
for ACNet). The unit kinds and the module names each produces:

========================  ==============================  =======================
unit (upstream method)     baseline                        ACB (kxk, 1 < k < 7)
========================  ==============================  =======================
``Conv2d``                 ``<u>.weight`` (+ ``bias``)      ``<u>.square_conv...``
``Conv2dBN``               ``<u>.conv``, ``<u>.bn``         ``<u>.square_conv...``
``Conv2dBNReLU``           ``<u>.conv``, ``<u>.bn``         ``<u>.acb.square_conv...``
``BNReLUConv2d``           ``<u>.bn``, ``<u>.conv``         ``<u>.bn``, ``<u>.acb...``
========================  ==============================  =======================

so a ``Conv2dBN`` unit *is* the block while a ``Conv2dBNReLU`` unit wraps it
as ``acb``. 1x1 and kxk convs with k >= 7 stay plain in every form.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from acnet_convert.nn import ACBlock
from acnet_convert.zoo import Form, check_form

__all__ = ["Form", "Units", "check_form"]


def _seq(*named: tuple[str, nn.Module]) -> nn.Sequential:
    seq = nn.Sequential()
    for name, module in named:
        seq.add_module(name, module)
    return seq


@dataclass(frozen=True)
class Units:
    """Builds conv units the way upstream's builders do, for one :data:`Form`."""

    form: Form

    def uses_acb(self, kernel_size: int) -> bool:
        """Upstream's rule: ACNet turns kxk convs with 1 < k < 7 into blocks."""
        return self.form != "baseline" and 1 < kernel_size < 7

    def _acb(self, cin: int, cout: int, k: int, stride: int, padding: int) -> ACBlock:
        return ACBlock(cin, cout, k, stride=stride, padding=padding, deploy=self.form == "deploy")

    @staticmethod
    def _conv(cin: int, cout: int, k: int, stride: int, padding: int, bias: bool) -> nn.Conv2d:
        return nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=bias)

    def conv(
        self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, bias: bool = True
    ) -> nn.Module:
        """Upstream ``Conv2d``: a bare conv, or the block itself."""
        if self.uses_acb(k):
            return self._acb(cin, cout, k, stride, padding)
        return self._conv(cin, cout, k, stride, padding, bias)

    def conv_bn(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0) -> nn.Module:
        """Upstream ``Conv2dBN``: ``conv`` + ``bn``, or the block itself."""
        if self.uses_acb(k):
            return self._acb(cin, cout, k, stride, padding)
        return _seq(
            ("conv", self._conv(cin, cout, k, stride, padding, False)),
            ("bn", nn.BatchNorm2d(cout)),
        )

    def conv_bn_relu(
        self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0
    ) -> nn.Module:
        """Upstream ``Conv2dBNReLU``: ``conv`` + ``bn`` + ``relu``, or ``acb`` + ``relu``."""
        if self.uses_acb(k):
            return _seq(("acb", self._acb(cin, cout, k, stride, padding)), ("relu", nn.ReLU()))
        unit = self.conv_bn(cin, cout, k, stride, padding)
        unit.add_module("relu", nn.ReLU())
        return unit

    def bn_relu_conv(
        self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0
    ) -> nn.Module:
        """Upstream ``BNReLUConv2d`` (pre-activation): ``bn`` + ``relu`` + ``conv`` or ``acb``."""
        conv: nn.Module
        if self.uses_acb(k):
            conv, name = self._acb(cin, cout, k, stride, padding), "acb"
        else:
            conv, name = self._conv(cin, cout, k, stride, padding, False), "conv"
        return _seq(("bn", nn.BatchNorm2d(cin)), ("relu", nn.ReLU()), (name, conv))
