"""A full-page PNG of a run's report as headless Chromium renders it, e.g. the README figure:

    .venv/bin/python scripts/screenshot_report.py runs/NAME docs/report.png
    .venv/bin/python scripts/screenshot_report.py runs/NAME/report.html /tmp/report.png --width 1000

RUN_OR_REPORT is a run folder (its report.html is written first, from what `imgcls eval` left there)
or an HTML file. The page is checked on the way: an image that does not load or an error in the
browser console makes the script exit with status 1, after writing the PNG.

Needs selenium (pip install selenium) and Chromium with its driver (apt-get install chromium chromium-driver).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imgcls.errors import ImgclsError
from imgcls.report import render_in_browser, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_or_report", type=Path, help="run folder, or an HTML report")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--width", type=int, default=1200, help="window width in CSS pixels (default 1200)")
    parser.add_argument("--split", help="evaluated split of a run folder (default: test, else val)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.run_or_report, args.split) if args.run_or_report.is_dir() else args.run_or_report
        check = render_in_browser(report, screenshot_png=args.out, width=args.width)
    except ImgclsError as error:
        print(f"screenshot_report: error: {error}", file=sys.stderr)
        return 2
    print(f"{check['screenshot']}: {report}, {check['images']} images, {check['height']} px tall")
    problems = [f"image not loaded: {alt}" for alt in check["broken_images"]]
    problems += [f"console: {message}" for message in check["console_errors"]]
    for problem in problems:
        print(f"screenshot_report: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
