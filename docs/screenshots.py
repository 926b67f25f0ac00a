"""Screenshots of the explorer's pages for the README, taken in headless chromium.

    flowdb serve &        # prints http://localhost:8047/?token=TOKEN
    .venv/bin/python docs/screenshots.py http://localhost:8047 TOKEN PLANTED_KEY SMOLLM2_KEY [FAMILY_KEY]

PLANTED_KEY is a feature of the planted demo pack (scripts/demo.sh prints one) and
SMOLLM2_KEY one of the SmolLM2 demo pack labelled with `flowdb labels contexts`;
FAMILY_KEY (default SMOLLM2_KEY) one whose pack is linked with another (flowdb link).
Pictures go to docs/figures/explorer-*.png.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from urllib.parse import quote

OUT = Path(__file__).parent / "figures"


def main(base: str, token: str, planted: str, smollm2: str, family: str | None = None) -> None:
    from playwright.sync_api import sync_playwright

    pack = smollm2.split("/", 1)[0]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1360, "height": 900}, device_scale_factor=1)
        page.goto(f"{base}/?token={token}")  # the cookie steering needs

        def shot(name: str, path: str, full: bool = True, before=None) -> None:
            page.goto(base + path)
            page.wait_for_function("document.body.dataset.ready", timeout=60_000)
            if before:
                before()
            page.wait_for_timeout(600)
            page.screenshot(path=str(OUT / f"explorer-{name}.png"), full_page=full)
            print(f"wrote docs/figures/explorer-{name}.png")

        shot("packs", "/")
        shot("pack", "/pack/planted")
        shot("feature", f"/feature/{planted}?depth=6", full=False,
             before=lambda: page.evaluate("document.querySelector('h2').scrollIntoView()"))
        shot("feature-smollm2", f"/feature/{smollm2}?depth=2&max_rank=2", full=False)
        shot("pack-smollm2", f"/pack/{pack}")

        def family_table():
            page.wait_for_selector("#family-table td")
            page.evaluate("document.getElementById('family-table').previousElementSibling"
                          ".previousElementSibling.scrollIntoView()")
        shot("family", f"/feature/{family or smollm2}?depth=2", full=False, before=family_table)

        def typed():
            page.fill("#find-box", "import")
            page.locator("#find-suggestions li").first.wait_for()
        shot("search", f"/search?q={quote('import')}", full=False, before=typed)

        def run_console():
            page.fill("#cypher-statement", f"MATCH (a:Feature)-[e:RESIDUAL]->(b:Feature {{key: '{smollm2}'}}) "
                                           "RETURN a, e, b")
            page.click("#cypher-form button[type=submit]")
            page.wait_for_selector("#console-table td")
        shot("console", "/console", before=run_console)

        def steer():
            page.fill("#steering-form input[name=prompt]", "My favourite thing to write is")
            page.fill("#steering-form input[name=s]", "6")
            page.fill("#steering-form input[name=max_new_tokens]", "24")
            page.click("#steering-form button[type=submit]")
            page.wait_for_function("/^(done|failed|cancelled)/.test(document.getElementById('steering-progress')"
                                   ".textContent)", timeout=300_000)
            page.evaluate("document.getElementById('steering').scrollIntoView()")
        shot("steering", f"/feature/{smollm2}", full=False, before=steer)
        browser.close()


if __name__ == "__main__":
    if len(sys.argv) not in (5, 6):
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
