"""The code examples of the documentation run as written (they once called a parameter that does not
exist), and do what the text around them says."""

import re
from pathlib import Path

import torch

ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def python_blocks(markdown: str, section: str) -> list[str]:
    """The ```python blocks of the section whose heading starts with ``section`` (up to the next heading
    of the same or a higher level)."""
    m = re.search(rf"^(#+) {re.escape(section)}.*$", markdown, flags=re.M)
    assert m, f"no section {section!r}"
    rest = markdown[m.end():]
    end = re.search(rf"^#{{1,{len(m.group(1))}}} ", rest, flags=re.M)
    body = rest[: end.start()] if end else rest
    return re.findall(r"^```python\n(.*?)^```", body, flags=re.M | re.S)


def test_contract_3_example_runs_and_uses_the_documented_guidance_convention():
    blocks = python_blocks(ARCHITECTURE.read_text(), "Contract 3")
    assert len(blocks) == 1
    ns: dict = {}
    torch.manual_seed(0)
    exec(compile(blocks[0], f"{ARCHITECTURE}:contract-3", "exec"), ns)
    x, x_cf = ns["x"], ns["x_cf"]
    assert x_cf.shape == x.shape and torch.isfinite(x_cf).all()

    # The text: scale = 1 + Ho & Salimans' w, i.e. scale 3 is (1 + 2) eps(c) - 2 eps(null). The toy UNet's
    # zero-initialised layers make eps = 0 whatever the label, so perturb its weights first; `den` wraps
    # the same module.
    unet = ns["unet"].double()  # float64 weights: the batched and the separate calls agree to float32 rounding
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t = x.double(), torch.full((1,), 500)
    eps_c = unet(x, t, y=ns["healthy"])
    eps_null = unet(x, t, y=ns["null"])
    assert (eps_c - eps_null).abs().max() > 1e-3  # the label matters: another convention would fail below
    w_ho_salimans = 2.0
    expected = (1 + w_ho_salimans) * eps_c - w_ho_salimans * eps_null
    got = ns["den"](x, t, {"y": ns["healthy"]})
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=2e-6)  # the UNet returns float32
