"""Screenshots of the explorer's pages for the README, taken in headless chromium.

    flowdb serve &        # prints http://localhost:8047/?token=TOKEN
    .venv/bin/python docs/screenshots.py http://localhost:8047 TOKEN PLANTED_KEY SMOLLM2_KEY [FAMILY_KEY]

PLANTED_KEY is a feature of the planted demo pack (scripts/demo.sh prints one) and
SMOLLM2_KEY one of the SmolLM2 demo pack labelled with `flowdb labels contexts`;
FAMILY_KEY (default SMOLLM2_KEY) one whose pack is linked with another (flowdb link).

The attribution-graph pages, on example graphs tied to the planted demo pack:

    .venv/bin/python docs/screenshots.py --example-graphs DIR     # writes DIR/capital-*.json
    flowdb circuits import DIR --pack planted --module res
    .venv/bin/python docs/screenshots.py --graphs http://localhost:8047 TOKEN capital-dallas

Pictures go to docs/figures/explorer-*.png.
"""

from __future__ import annotations

import json
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

OUT = Path(__file__).parent / "figures"


@contextmanager
def opened(base: str, token: str, height: int = 900):
    """A chromium page holding the explorer's token cookie (steering needs it)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1360, "height": height}, device_scale_factor=1)
        page.goto(f"{base}/?token={token}")
        try:
            yield page
        finally:
            browser.close()


def shot(page, base: str, name: str, path: str, full: bool = True, before=None) -> None:
    page.goto(base + path)
    page.wait_for_function("document.body.dataset.ready", timeout=60_000)
    if before:
        before()
    page.wait_for_timeout(600)
    page.screenshot(path=str(OUT / f"explorer-{name}.png"), full_page=full)
    print(f"wrote docs/figures/explorer-{name}.png")


def main(base: str, token: str, planted: str, smollm2: str, family: str | None = None) -> None:
    pack = smollm2.split("/", 1)[0]
    with opened(base, token) as page:
        shot(page, base, "packs", "/")
        shot(page, base, "pack", "/pack/planted")
        shot(page, base, "feature", f"/feature/{planted}?depth=6", full=False,
             before=lambda: page.evaluate("document.querySelector('h2').scrollIntoView()"))
        shot(page, base, "feature-smollm2", f"/feature/{smollm2}?depth=2&max_rank=2", full=False)
        shot(page, base, "pack-smollm2", f"/pack/{pack}")

        def family_table():
            page.wait_for_selector("#family-table td")
            page.evaluate("document.getElementById('family-table').previousElementSibling"
                          ".previousElementSibling.scrollIntoView()")
        shot(page, base, "family", f"/feature/{family or smollm2}?depth=2", full=False, before=family_table)

        def typed():
            page.fill("#find-box", "import")
            page.locator("#find-suggestions li").first.wait_for()
        shot(page, base, "search", f"/search?q={quote('import')}", full=False, before=typed)

        def run_console():
            page.fill("#cypher-statement", f"MATCH (a:Feature)-[e:RESIDUAL]->(b:Feature {{key: '{smollm2}'}}) "
                                           "RETURN a, e, b")
            page.click("#cypher-form button[type=submit]")
            page.wait_for_selector("#console-table td")
        shot(page, base, "console", "/console", before=run_console)

        def steer():
            page.fill("#steering-form input[name=prompt]", "My favourite thing to write is")
            page.fill("#steering-form input[name=s]", "6")
            page.fill("#steering-form input[name=max_new_tokens]", "24")
            page.click("#steering-form button[type=submit]")
            page.wait_for_function("/^(done|failed|cancelled)/.test(document.getElementById('steering-progress')"
                                   ".textContent)", timeout=300_000)
            page.evaluate("document.getElementById('steering').scrollIntoView()")
        shot(page, base, "steering", f"/feature/{smollm2}", full=False, before=steer)


def graph_pages(base: str, token: str, slug: str) -> None:
    """The graphs list, and one graph drawn with its supernodes."""
    with opened(base, token, height=1240) as page:  # the graph's record, the graph and its supernodes
        shot(page, base, "graph", f"/graph/{quote(slug)}", full=False)
        page.set_viewport_size({"width": 1360, "height": 420})
        shot(page, base, "graphs", "/graphs")


# Example graphs in circuit-tracer's format: "the capital of the state containing CITY is", a
# two-hop path (city -> state -> say the capital) as in Lindsey et al.'s Dallas/Austin graph.
# The features are made up, named by indices of the planted demo pack (6 layers of 4,096).
EXAMPLES = {  # slug -> city, state, capital, and the feature index of each at layers 0-4
    "capital-dallas": ("Dallas", "Texas", "Austin", 101, 318, 612),
    "capital-oakland": ("Oakland", "California", "Sacramento", 133, 347, 655),
    "capital-miami": ("Miami", "Florida", "Tallahassee", 171, 389, 698),
}


def example_graph(slug: str, city: str, state: str, capital: str, city_at: int, state_at: int, say_at: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(sum(map(ord, slug)))
    tokens = ["<bos>", "Fact", ":", " the", " capital", " of", " the", " state", " containing", f" {city}", " is"]
    last = len(tokens) - 1
    features = [  # layer, index, positions, clerp
        (0, city_at, [9], city), (1, city_at + 1, [9], f"{city} (city)"), (2, state_at, [9], state),
        (3, state_at + 1, [9, last], f"{state} (state)"), (1, 150, [7, 8], "state"), (0, 77, [4], "capital"),
        (2, 290, [4], "capital cities"), (4, 505, [last], "say a capital"), (4, say_at, [last], capital),
        (5, say_at + 1, [last], f"say {capital}")]
    nodes = [{"node_id": f"E_{1000 + pos}_{pos}", "feature": pos, "layer": "E", "ctx_idx": pos,
              "feature_type": "embedding", "jsNodeId": f"E_{1000 + pos}-{pos}", "clerp": "", "influence": None,
              "activation": None} for pos in range(len(tokens))]
    for layer, index, positions, clerp in features:
        nodes += [{"node_id": f"{layer}_{index}_{pos}", "feature": layer * 100_000 + index, "layer": str(layer),
                   "ctx_idx": pos, "feature_type": "cross layer transcoder", "jsNodeId": f"{layer}_{index}-0",
                   "clerp": clerp, "influence": None, "activation": float(rng.uniform(2, 12))} for pos in positions]
    nodes += [{"node_id": f"{layer}_-1_{pos}", "feature": -1, "layer": str(layer), "ctx_idx": pos,
               "feature_type": "mlp reconstruction error", "jsNodeId": f"{layer}_-1-{pos}", "clerp": "",
               "influence": None, "activation": None} for layer, pos in ((2, 9), (4, last))]
    for j, (word, p) in enumerate(((capital, 0.48), (city, 0.07), ("the", 0.05))):
        nodes.append({"node_id": f"6_{2000 + j}_{last}", "feature": 2000 + j, "layer": "6", "ctx_idx": last,
                      "feature_type": "logit", "token_prob": p, "is_target_logit": j == 0,
                      "jsNodeId": f"L_{2000 + j}-{last}", "clerp": f'Output " {word}" (p={p:.3f})'})
    ids = [n["node_id"] for n in nodes]
    say = f"5_{say_at + 1}_{last}"
    path = [  # the two hops, the capital's features and the outputs
        ("E_1009_9", f"0_{city_at}_9", 6), (f"0_{city_at}_9", f"1_{city_at + 1}_9", 4),
        (f"1_{city_at + 1}_9", f"2_{state_at}_9", 5), (f"2_{state_at}_9", f"3_{state_at + 1}_9", 3),
        (f"3_{state_at + 1}_9", say, 3), (f"3_{state_at + 1}_{last}", say, 2.5), ("E_1007_7", "1_150_7", 3),
        ("1_150_7", f"2_{state_at}_9", 1.5), ("E_1008_8", "1_150_8", 2), ("1_150_8", f"3_{state_at + 1}_{last}", 1.2),
        ("E_1004_4", "0_77_4", 5), ("0_77_4", "2_290_4", 3), ("2_290_4", f"4_505_{last}", 3.5),
        (f"4_505_{last}", say, 4), (f"4_{say_at}_{last}", say, 2), ("E_1010_10", f"4_505_{last}", 2),
        ("2_-1_9", f"3_{state_at + 1}_9", 1), (f"4_-1_{last}", say, 1.5), (say, f"6_2000_{last}", 8),
        (say, f"6_2001_{last}", -2), (f"1_{city_at + 1}_9", f"6_2001_{last}", 2.5),
        (f"2_{state_at}_9", f"6_2001_{last}", -1.5)]
    links = {(s, t): w for s, t, w in path}
    depth = {n["node_id"]: (-1 if n["layer"] == "E" else int(n["layer"]), n["ctx_idx"]) for n in nodes}
    for _ in range(120):  # weaker links for texture: to a higher layer, at the same or a nearby later position
        s, t = rng.choice(ids, size=2, replace=False)
        if depth[s][0] < depth[t][0] and 0 <= depth[t][1] - depth[s][1] <= 2:
            links.setdefault((str(s), str(t)), round(float(rng.normal() * 0.6), 3))
    strength = {node_id: 0.0 for node_id in ids}  # influence: circuit-tracer's cumulative share, strongest first
    for (s, t), w in links.items():
        strength[s] += abs(w)
        strength[t] += abs(w)
    ranked = sorted((n for n in nodes if n["feature_type"] != "logit"), key=lambda n: -strength[n["node_id"]])
    total = sum(strength[n["node_id"]] for n in ranked)
    running = 0.0
    for n in ranked:
        running += strength[n["node_id"]]
        n["influence"] = round(running / total, 4)
    texas = [f"2_{state_at}_9", f"3_{state_at + 1}_9", f"3_{state_at + 1}_{last}"]
    return {"metadata": {"slug": slug, "scan": "planted-model", "transcoder_list": [], "prompt_tokens": tokens,
                         "prompt": "".join(tokens[1:]), "node_threshold": 0.8},
            "qParams": {"pinnedIds": texas, "supernodes": [[state, *texas]], "linkType": "both", "clickedId": "",
                        "sg_pos": ""},
            "nodes": nodes, "links": [{"source": s, "target": t, "weight": w} for (s, t), w in links.items()]}


def write_example_graphs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for slug, example in EXAMPLES.items():
        (folder / f"{slug}.json").write_text(json.dumps(example_graph(slug, *example)))
        print(f"wrote {folder / slug}.json")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--example-graphs"] and len(sys.argv) == 3:
        write_example_graphs(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["--graphs"] and len(sys.argv) == 5:
        graph_pages(*sys.argv[2:])
    elif len(sys.argv) in (5, 6):
        main(*sys.argv[1:])
    else:
        raise SystemExit(__doc__)
