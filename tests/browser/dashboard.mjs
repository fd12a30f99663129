// Opens the shoal dashboard in headless Debian chromium, waits for live
// updates, checks that the node table and the allocation chart are there
// and change, and saves a screenshot.
// Usage: node dashboard.mjs URL SCREENSHOT.png
import { chromium } from "playwright-core";

const [url, shot] = process.argv.slice(2);
if (!url || !shot) {
  console.error("usage: node dashboard.mjs URL SCREENSHOT.png");
  process.exit(2);
}
const fail = (msg) => {
  console.error("FAIL: " + msg);
  process.exit(1);
};

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
try {
  const page = await browser.newPage({ viewport: { width: 1500, height: 1000 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(url);
  // Live over SSE: the connection indicator turns "live" on the first snapshot.
  await page.waitForFunction(() => document.querySelector("#conn").textContent === "live", null, { timeout: 20000 });
  await page.waitForSelector("#nodes tbody tr", { timeout: 20000 });
  const rows = await page.$$eval("#nodes tbody tr", (r) => r.length);
  if (rows < 1) fail("no node rows");
  await page.waitForSelector("svg.chart", { timeout: 30000 });
  const read = () => page.evaluate(() => ({
    summary: document.querySelector("#summary").textContent,
    points: Number((document.querySelector("svg.chart") || {}).dataset?.points || 0),
    leases: [...document.querySelectorAll("#nodes tbody tr td:nth-child(4)")].map((t) => t.textContent).join(","),
    events: document.querySelectorAll("#events div").length,
  }));
  const first = await read();
  // The page must change by itself: more chart points and a new update count.
  await page.waitForFunction(
    (p) => Number(document.querySelector("svg.chart")?.dataset.points || 0) > p + 1,
    first.points,
    { timeout: 30000 },
  );
  const second = await read();
  if (second.summary === first.summary) fail("the summary did not update");
  if (second.leases === first.leases) fail("the node table did not change");
  if (second.events < 1) fail("no events in the log");
  await page.screenshot({ path: shot, fullPage: true });
  if (errors.length) fail("page errors: " + errors.join("; "));
  console.log(JSON.stringify({ ok: true, rows, first, second, screenshot: shot }));
} finally {
  await browser.close();
}
