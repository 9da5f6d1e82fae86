"""The grouped bar chart the scale benchmark draws: each bar as tall as its value, in its series' colour."""

from PIL import Image

from rwkv_state_hub.plot import SERIES, save_bar_charts


def _bar_height(img: Image.Image, colour: tuple[int, int, int], x_range: range) -> int:
    """The tallest run of `colour` in any pixel column within `x_range`."""
    best = 0
    for x in x_range:
        run = sum(1 for y in range(img.height) if img.getpixel((x, y)) == colour)
        best = max(best, run)
    return best


def test_bars_are_proportional_to_their_values(tmp_path):
    path = tmp_path / "chart.png"
    save_bar_charts([("speed", {"A": [100.0, 50.0], "B": [25.0, 0.0]})], ["first", "second"], path)
    img = Image.open(path).convert("RGB")
    panel = range(0, 520)
    first, second = _bar_height(img, SERIES[0], panel), _bar_height(img, SERIES[1], panel)
    assert first > 100 and abs(second / first - 0.5) < 0.02  # the tallest bar of each series: 100 and 50
    # group B: the first series' bar is a quarter of group A's; the second series' zero draws (almost) nothing
    right_half = range(290, 510)
    assert abs(_bar_height(img, SERIES[0], right_half) / first - 0.25) < 0.02
    assert _bar_height(img, SERIES[1], right_half) <= 1
