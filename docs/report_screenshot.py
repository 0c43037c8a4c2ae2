"""The README's picture of report.html, taken in headless Chromium with the network off.

    python jobs/classify.py --config configs/imagenet-sample.yaml --runtime.device cpu \\
        --model.name ~/.cache/batch-classify/demo/efficientnet-lite0 --output.dir /tmp/lite0
    python docs/report_screenshot.py /tmp/lite0/report.html docs/report-page.png

Needs Debian's chromium and chromium-driver and selenium (the test extras). Two views, stacked:
the class table sorted by top-1 (worst first) and the most-confused pairs; 960 px wide, 192
colours, so the file stays small.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.by import By

WIDTH = 960


def screenshots(page: Path) -> list[Image.Image]:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                     "--window-size=1200,760", "--host-resolver-rules=MAP * ~NOTFOUND",
                     "--proxy-server=127.0.0.1:9"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"))
    try:
        driver.get(page.resolve().as_uri())
        headers = driver.find_elements(By.CSS_SELECTOR, "#class-table thead th")
        next(h for h in headers if h.text.startswith("top-1")).click()
        driver.execute_script("document.getElementById('classes').scrollIntoView()")
        time.sleep(1)
        shots = [Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")]
        driver.execute_script("document.querySelectorAll('img').forEach(function (i) {"
                              " i.loading = 'eager'; });"
                              "document.getElementById('pairs').scrollIntoView()")
        time.sleep(3)
        shots.append(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB"))
        return shots
    finally:
        driver.quit()


def main(page: str, target: str) -> None:
    shots = screenshots(Path(page))
    canvas = Image.new("RGB", (shots[0].width, sum(s.height for s in shots) + 8), (200, 200, 200))
    canvas.paste(shots[0], (0, 0))
    canvas.paste(shots[1], (0, shots[0].height + 8))
    canvas = canvas.resize((WIDTH, round(canvas.height * WIDTH / canvas.width)), Image.LANCZOS)
    canvas.quantize(colors=192, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)
    print(target, Path(target).stat().st_size, "bytes")


if __name__ == "__main__":
    main(*sys.argv[1:3])
