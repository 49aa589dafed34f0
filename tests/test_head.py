"""ArcFaceHead against hand-computed closed forms and an independent float64 implementation."""

import math

import pytest
import torch
import torch.nn.functional as F

from arcface.head import ArcFaceHead, check_margin

S = 64.0
M = 0.5


def unit(angle_deg: float) -> list[float]:
    """A 2-D unit vector at `angle_deg` from the x axis."""
    return [math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))]


def axis_head(**kwargs) -> ArcFaceHead:
    """2 classes in 2-D: class 0 along x, class 1 along y."""
    head = ArcFaceHead(2, 2, **kwargs)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))  # norms must not matter
    return head


def test_hand_computed_two_class_logits():
    head = axis_head(scale=S, margin=M)
    # Sample 0 at 30 deg (label 0), sample 1 at 170 deg (label 0: past pi - m, the fallback),
    # sample 2 at 80 deg (label 1), with norms that must not matter.
    features = torch.tensor([[2 * v for v in unit(30)], unit(170), [5 * v for v in unit(80)]])
    labels = torch.tensor([0, 0, 1])

    cos = [
        [math.cos(math.radians(30)), math.cos(math.radians(60))],
        [math.cos(math.radians(170)), math.cos(math.radians(80))],
        [math.cos(math.radians(80)), math.cos(math.radians(10))],
    ]
    expected_plain = [[S * c for c in row] for row in cos]
    expected_margin = [
        [S * math.cos(math.acos(cos[0][0]) + M), S * cos[0][1]],
        [S * (cos[1][0] - M * math.sin(M)), S * cos[1][1]],
        [S * cos[2][0], S * math.cos(math.acos(cos[2][1]) + M)],
    ]
    torch.testing.assert_close(
        head(features), torch.tensor(expected_plain), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        head(features, labels), torch.tensor(expected_margin), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(head.cosine(features), torch.tensor(cos), atol=1e-6, rtol=0)


def test_fallback_region_and_monotonic_target_logit():
    head = axis_head(scale=1.0, margin=M)
    threshold_deg = math.degrees(math.pi - M)  # 151.35 deg
    angles = [threshold_deg - 5, threshold_deg + 5]
    features = torch.tensor([unit(a) for a in angles])
    logits = head(features, torch.tensor([0, 0]))[:, 0]
    below, above = (math.radians(a) for a in angles)
    expected = [math.cos(below + M), math.cos(above) - M * math.sin(M)]
    torch.testing.assert_close(logits, torch.tensor(expected), atol=1e-6, rtol=0)

    # The fallback exists so that a larger angle never earns a larger target logit.
    sweep = torch.linspace(0, 180, 721)
    features = torch.stack([torch.cos(torch.deg2rad(sweep)), torch.sin(torch.deg2rad(sweep))], 1)
    target_logit = head(features, torch.zeros(len(sweep), dtype=torch.long))[:, 0]
    assert (target_logit[1:] < target_logit[:-1]).all()


def test_easy_margin_applies_only_to_positive_cosines():
    head = axis_head(scale=S, margin=M, easy_margin=True)
    features = torch.tensor([unit(60), unit(120), unit(170)])
    logits = head(features, torch.zeros(3, dtype=torch.long))[:, 0]
    expected = [
        S * math.cos(math.radians(60) + M),
        S * math.cos(math.radians(120)),  # cos <= 0: unchanged
        S * math.cos(math.radians(170)),  # no fallback either
    ]
    torch.testing.assert_close(logits, torch.tensor(expected), atol=1e-4, rtol=0)


def test_sub_center_cosine_is_max_over_rows_c_times_k_plus_j():
    k = 3
    head = ArcFaceHead(2, 2, scale=S, margin=M, sub_centers=k)
    assert head.weight.shape == (2 * k, 2)
    angles = [0, 100, 200, 45, 135, 300]  # rows 0-2: class 0; rows 3-5: class 1
    with torch.no_grad():
        head.weight.copy_(torch.tensor([unit(a) for a in angles]))
    feature = torch.tensor([unit(20)])

    def nearest_cos(rows):
        return max(math.cos(math.radians(20 - angles[r])) for r in rows)

    expected_cos = [nearest_cos([0, 1, 2]), nearest_cos([3, 4, 5])]  # 20 deg and 25 deg
    torch.testing.assert_close(
        head.cosine(feature), torch.tensor([expected_cos]), atol=1e-6, rtol=0
    )
    logits = head(feature, torch.tensor([1]))
    expected = [S * expected_cos[0], S * math.cos(math.acos(expected_cos[1]) + M)]
    torch.testing.assert_close(logits, torch.tensor([expected]), atol=1e-4, rtol=0)


def test_weight_layout_matches_mmpretrain_and_pml_formulas():
    torch.manual_seed(0)
    classes, k, dim = 5, 3, 8
    head = ArcFaceHead(dim, classes, sub_centers=k)
    features = torch.randn(6, dim)
    # mmpretrain NormProduct: linear(normalize(x), normalize(W)).view(-1, C, k).max(2)
    mm = F.linear(F.normalize(features), F.normalize(head.weight)).view(-1, classes, k).amax(2)
    # pytorch-metric-learning: W is (dim, C * k), the same columns: W = weight.T
    pml_w = head.weight.detach().T.clone()
    pml = (F.normalize(features) @ F.normalize(pml_w, dim=0)).view(-1, classes, k).amax(2)
    torch.testing.assert_close(head.cosine(features), mm.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(head.cosine(features), pml, atol=1e-6, rtol=0)


def test_per_class_margins_from_sequence_and_file(tmp_path):
    margins = [0.1, 0.7]
    path = tmp_path / "margins.txt"
    path.write_text("0.1\n0.7\n\n")
    features = torch.tensor([unit(30), unit(50)])
    labels = torch.tensor([0, 1])
    expected = torch.tensor(
        [
            [S * math.cos(math.radians(30) + 0.1), S * math.cos(math.radians(60))],
            [S * math.cos(math.radians(50)), S * math.cos(math.radians(40) + 0.7)],
        ]
    )
    for margin in (margins, str(path), path):
        head = axis_head(scale=S, margin=margin)
        torch.testing.assert_close(head(features, labels), expected, atol=1e-4, rtol=0)
    assert "margin" not in axis_head().state_dict()  # configuration, not learned state


@pytest.mark.parametrize(
    "content, message",
    [
        ("0.1\nabc\n", r"margins\.txt:2: expected one margin"),
        ("0.1\n\n0.2\n", r"margins\.txt:2: expected one margin"),
        ("0.1\n0.2\n0.3\n", r"margins\.txt: has 3 margins, expected 2"),
        ("0.1\n", r"margins\.txt: has 1 margins, expected 2"),
        ("0.1\n-0.2\n", r"margins\.txt:2: margin must be in \[0, pi\)"),
        ("0.1\nnan\n", r"margins\.txt:2: margin must be in \[0, pi\)"),
    ],
)
def test_margin_file_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "margins.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        ArcFaceHead(4, 2, margin=path)


@pytest.mark.parametrize("value", [-0.1, math.pi, 4.0, float("nan"), float("inf")])
def test_check_margin_refuses_values_outside_zero_to_pi_naming_the_place(value):
    with pytest.raises(ValueError, match=r"^run\.toml:3: margin must be in \[0, pi\) radians"):
        check_margin(value, "run.toml:3")
    check_margin(0.0, "run.toml:3")
    check_margin(math.nextafter(math.pi, 0.0), "run.toml:3")


def test_margin_argument_errors(tmp_path):
    with pytest.raises(ValueError, match=r"got 3 per-class margins, expected 2"):
        ArcFaceHead(4, 2, margin=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"margin\[1\]: margin must be in"):
        ArcFaceHead(4, 2, margin=[0.1, 4.0])
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        ArcFaceHead(4, 2, margin=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="sub_centers must be a positive integer"):
        ArcFaceHead(4, 2, sub_centers=0)
    with pytest.raises(ValueError, match="scale must be a positive number"):
        ArcFaceHead(4, 2, scale=-1.0)
    with pytest.raises(ValueError, match=r"features must have shape \(N, 4\)"):
        ArcFaceHead(4, 2)(torch.randn(3, 5))


@pytest.mark.parametrize("easy_margin", [False, True])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_gradients_finite_at_cos_exactly_plus_minus_one(easy_margin, sign):
    torch.manual_seed(0)
    head = ArcFaceHead(4, 3, sub_centers=2, easy_margin=easy_margin)
    # Both sub-centers of a class equal, so that its cosine is exactly +-1 (a tie in the max).
    with torch.no_grad():
        head.weight[0:2] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # class 0
        head.weight[2:4] = torch.randn(4)  # class 1
    features = torch.stack([sign * head.weight[0], sign * head.weight[2]]).detach()
    features.requires_grad_(True)
    labels = torch.tensor([0, 1])
    cos = head.cosine(features)
    assert cos[0, 0].item() == sign  # the singular point of d acos / dx is really reached
    assert abs(cos[1, 1].item()) > 1 - 1e-6
    loss = F.cross_entropy(head(features, labels), labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(features.grad).all()
    assert torch.isfinite(head.weight.grad).all()

    # The margin function itself must have a finite slope at +-1, whatever the backward of the
    # cosine clamp does at its bounds (d/dx acos(x) is infinite there).
    cos_at_bounds = torch.tensor([[1.0], [-1.0]], requires_grad=True)
    head._add_margin(cos_at_bounds, torch.full((2, 1), M)).sum().backward()
    assert torch.isfinite(cos_at_bounds.grad).all()


def test_cosine_never_leaves_minus_one_to_one():
    torch.manual_seed(0)
    head = ArcFaceHead(64, 100)
    scales = torch.logspace(-3, 3, 100)[:, None]
    cos = head.cosine(torch.cat([head.weight * scales, -head.weight * scales]).detach())
    assert cos.abs().max().item() <= 1.0
    assert torch.isfinite(head(head.weight.detach(), torch.arange(100))).all()


def test_float32_under_bfloat16_autocast():
    torch.manual_seed(0)
    head = ArcFaceHead(16, 10, sub_centers=2)
    features = torch.randn(8, 16)
    labels = torch.randint(0, 10, (8,))
    reference = head(features, labels)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        logits = head(features, labels)
        logits_from_bf16 = head(features.bfloat16(), labels)
        cos = head.cosine(features)
    assert logits.dtype == torch.float32 and cos.dtype == torch.float32
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    assert logits_from_bf16.dtype == torch.float32
    F.cross_entropy(logits, labels).backward()
    assert head.weight.grad.dtype == torch.float32


def reference_logits(features, weight, labels, margins, k, scale, easy_margin):
    """Float64 ArcFace logits written from the paper's angle form: cos(theta + m)."""
    x = features.double() / features.double().norm(dim=1, keepdim=True)
    w = weight.double() / weight.double().norm(dim=1, keepdim=True)
    num_classes = w.shape[0] // k
    cos = (x @ w.T).reshape(len(x), num_classes, k).max(dim=2).values.clamp(-1, 1)
    rows = []
    for i, label in enumerate(labels.tolist()):
        m = float(margins[label])
        c = cos[i, label]
        theta = torch.acos(c)
        if easy_margin:
            target = torch.cos(theta + m) if c > 0 else c
        else:
            target = torch.cos(theta + m) if theta + m < math.pi else c - m * math.sin(m)
        onehot = F.one_hot(torch.tensor(label), num_classes).double()
        rows.append(cos[i] * (1 - onehot) + target * onehot)
    return scale * torch.stack(rows)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("easy_margin", [False, True])
def test_loss_and_gradients_match_float64_reference(k, easy_margin):
    torch.manual_seed(k)
    classes, dim, n = 7, 12, 24
    margins = 0.3 + 0.5 * torch.rand(classes)
    head = ArcFaceHead(dim, classes, scale=S, margin=margins.tolist(), sub_centers=k,
                       easy_margin=easy_margin)
    labels = torch.randint(0, classes, (n,))
    features = torch.randn(n, dim)
    # Sub-centers scattered around a per-class direction, and a third of the samples pointed
    # away from their class, so that the margin and its fallback branch are both taken.
    class_directions = torch.randn(classes, dim)
    with torch.no_grad():
        sub_center_noise = 0.15 * torch.randn(classes * k, dim)
        head.weight.copy_(class_directions.repeat_interleave(k, 0) + sub_center_noise)
        features[: n // 3] = -class_directions[labels[: n // 3]] + 0.05 * torch.randn(n // 3, dim)
    features.requires_grad_(True)
    weight64 = head.weight.detach().double().requires_grad_(True)
    features64 = features.detach().double().requires_grad_(True)

    logits = head(features, labels)
    expected = reference_logits(features64, weight64, labels, margins, k, S, easy_margin)
    torch.testing.assert_close(logits.double(), expected, atol=2e-4, rtol=0)

    loss = F.cross_entropy(logits, labels)
    expected_loss = (torch.logsumexp(expected, dim=1) - expected[torch.arange(n), labels]).mean()
    assert abs(loss.item() - expected_loss.item()) < 1e-4 * max(1.0, expected_loss.item())

    loss.backward()
    expected_loss.backward()
    torch.testing.assert_close(features.grad.double(), features64.grad, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(head.weight.grad.double(), weight64.grad, atol=1e-4, rtol=1e-3)
    # Both branches of the margin were taken, so both were compared.
    target_cos = head.cosine(features.detach())[torch.arange(n), labels]
    if easy_margin:
        margin_applied = target_cos > 0
    else:
        margin_applied = target_cos > torch.cos(math.pi - margins[labels])
    assert margin_applied.any() and not margin_applied.all()


def test_margin_file_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "margins.txt"
    path.write_bytes(b"0.1\n0.2 \xb0\n")  # a Latin-1 degree sign
    with pytest.raises(ValueError, match=r"margins\.txt:2: not UTF-8 text \(byte 0xB0 at column 5\)"):
        ArcFaceHead(4, 2, margin=path)


def test_margin_file_with_a_byte_order_mark_and_crlf(tmp_path):
    path = tmp_path / "margins.txt"
    path.write_bytes(b"\xef\xbb\xbf0.1\r\n0.7\r\n")  # as Windows Notepad saves it
    assert ArcFaceHead(4, 2, margin=path).margin.tolist() == pytest.approx([0.1, 0.7])
