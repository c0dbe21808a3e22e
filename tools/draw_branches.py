"""Draw the intro's picture of NSA's three branches: book/figures/nsa_branches.svg.

    python tools/draw_branches.py    # rewrites the SVG; commit it with the book

One query at the last position of 512 keys, toy sizes (l = 32, d = 16, l' = 64, n = 3, w = 128),
and what each branch reads: the compressed branch every block's summary (shaded by an invented
p^cmp), the selected branch n blocks of l' keys at full resolution (block 0, the query's own
block and the one p^cmp scores highest), the window the last w keys. Illustration, not data.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

N, l, d, l_sel, w = 512, 32, 16, 64, 128
OUT = Path(__file__).resolve().parent.parent / "book" / "figures" / "nsa_branches.svg"
COLORS = {"cmp": "#4c72b0", "slc": "#dd8452", "win": "#55a868"}


def main() -> None:
    plt.rcParams.update({"font.size": 13, "svg.fonttype": "none", "svg.hashsalt": "nsa"})
    fig, ax = plt.subplots(figsize=(9, 4.2))
    ax.set_xlim(-175, N + 215)
    ax.set_ylim(-0.55, 3.5)
    ax.axis("off")
    rows = {"cmp": 2.4, "slc": 1.4, "win": 0.4}
    labels = {"cmp": "compressed: a summary of\n$l$=32 keys every $d$=16",
              "slc": "selected\n$n$=3 blocks of $l'$=64",
              "win": "sliding window\nlast $w$=128 keys"}
    # the keys, once, at the top
    ax.add_patch(Rectangle((0, 3.05), N, 0.22, facecolor="#dddddd", edgecolor="#888888", lw=0.6))
    ax.text(N / 2, 3.36, f"{N} keys; the query is the last one (t = {N - 1})", ha="center",
            va="bottom")
    # compressed: every block's summary, shade = an invented p^cmp peaked at block 17
    num_blocks = (N - l) // d + 1
    for i in range(num_blocks):
        p = 0.15 + 0.85 * max(0.0, 1 - abs(i - 17) / 3.5) + (0.4 if i == num_blocks - 1 else 0)
        ax.add_patch(Rectangle((i * d, rows["cmp"] - 0.18 + 0.12 * (i % 2)), l, 0.24,
                               facecolor=COLORS["cmp"], alpha=min(1.0, p), edgecolor="white",
                               lw=0.4))
    # selected: block 0, the top-scored block (keys 256..319 hold block 17's peak), own block
    for j in (0, 4, 7):
        ax.add_patch(Rectangle((j * l_sel, rows["slc"] - 0.2), l_sel, 0.4,
                               facecolor=COLORS["slc"], edgecolor="black", lw=0.6))
    for j in range(N // l_sel):
        ax.add_patch(Rectangle((j * l_sel, rows["slc"] - 0.2), l_sel, 0.4, fill=False,
                               edgecolor="#999999", lw=0.4, ls=":"))
    ax.text(0 + l_sel / 2, rows["slc"], "first", ha="center", va="center", fontsize=11)
    ax.text(4 * l_sel + l_sel / 2, rows["slc"], "top", ha="center", va="center", fontsize=11)
    ax.text(7 * l_sel + l_sel / 2, rows["slc"], "own", ha="center", va="center", fontsize=11)
    arrow = FancyArrowPatch((17 * d + l / 2, rows["cmp"] - 0.2), (4 * l_sel + l_sel / 2,
                            rows["slc"] + 0.22), arrowstyle="-|>", mutation_scale=12,
                            color="#555555", lw=1)
    ax.add_patch(arrow)
    ax.text(17 * d + l / 2 + 12, (rows["cmp"] + rows["slc"]) / 2 + 0.02,
            "scores pick\nthe blocks", fontsize=11, color="#555555", va="center")
    # window
    ax.add_patch(Rectangle((N - w, rows["win"] - 0.2), w, 0.4, facecolor=COLORS["win"],
                           edgecolor="black", lw=0.6))
    for key, y in rows.items():
        ax.text(-10, y, labels[key], ha="right", va="center", color=COLORS[key])
        ax.add_patch(FancyArrowPatch((N + 8, y), (N + 88, 1.4), arrowstyle="-|>",
                                     mutation_scale=12, color=COLORS[key], lw=1.2))
        ax.text(N + 10, y - 0.2 if key == "win" else y + 0.12,
                {"cmp": "$g^{cmp}$", "slc": "$g^{slc}$", "win": "$g^{win}$"}[key],
                ha="left", va="top" if key == "win" else "bottom", color=COLORS[key])
    ax.text(N + 96, 1.4, "$o_t = \\sum_c g^c_t\\, o^c_t$", ha="left", va="center")
    ax.text(N / 2, -0.3, "key position s →", ha="center", va="center", color="#555555")
    fig.tight_layout()
    fig.savefig(OUT, metadata={"Date": None, "Creator": None})
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
