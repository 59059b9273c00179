"""gradkit's curvature operators equal curvlinops' (an independent implementation) in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gk_testing import DTYPE, cnn_bn, inputs_for, mlp, targets_for
from gradkit.curvature import EFOperator, GGNOperator, HessianOperator

curvlinops = pytest.importorskip("curvlinops")

PAIRS = {
    "hessian": (HessianOperator, "HessianLinearOperator"),
    "ggn": (GGNOperator, "GGNLinearOperator"),
    "ef": (EFOperator, "EFLinearOperator"),
}
LOSSES = [
    nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum"),
    nn.MSELoss(), nn.MSELoss(reduction="sum"),
    nn.BCEWithLogitsLoss(), nn.BCEWithLogitsLoss(reduction="sum"),
]


@pytest.mark.parametrize("loss_fn", LOSSES, ids=repr)
@pytest.mark.parametrize("make", [mlp, cnn_bn], ids=["mlp", "cnn_bn"])
@pytest.mark.parametrize("kind", PAIRS)
def test_matches_curvlinops(kind, make, loss_fn):
    ours_cls, theirs_name = PAIRS[kind]
    model = make()
    d_out = 4 if make is mlp else 3
    X = inputs_for(model, 12)
    y = targets_for(loss_fn, 12, d_out)
    data = [(X[:5], y[:5]), (X[5:], y[5:])]
    params = [p for p in model.parameters() if p.requires_grad]
    theirs = getattr(curvlinops, theirs_name)(model, loss_fn, params, data)
    ours = ours_cls(model, loss_fn, data)
    V = torch.randn(ours.shape[0], 3, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    expected = theirs @ V
    torch.testing.assert_close(ours @ V, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
