// Opens the shoal dashboard in headless Debian chromium, waits for live
// updates, checks that the node table and the allocation chart are there
// and change, that charts have units and a time axis and fit the window,
// that the forecast never goes under the axis, that failed apps are red
// with their restarts and last error, that the time of the last update is
// shown and that a node's detail view opens; saves screenshots.
// Usage: node dashboard.mjs URL SCREENSHOT.png [NODE-SCREENSHOT.png]
import { chromium } from "playwright-core";

const [url, shot, nodeShot] = process.argv.slice(2);
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
    summary: document.querySelector("#summary").textContent + " " + document.querySelector("#updated").textContent,
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
  // The time of the last update, as a clock time.
  const updated = await page.$eval("#updated", (e) => e.textContent);
  if (!/^updated \d\d:\d\d:\d\d$/.test(updated)) fail("no time of the last update: " + updated);
  // Every chart: a unit, a time axis with clock labels, y ticks, inside the window.
  const charts = await page.$$eval("svg.chart", (svgs) => svgs.map((s) => ({
    unit: s.dataset.unit,
    yunit: s.querySelector(".yunit")?.textContent,
    xticks: [...s.querySelectorAll(".xtick")].map((t) => t.textContent),
    yticks: s.querySelectorAll(".ytick").length,
    right: s.getBoundingClientRect().right,
    axisY: Number(s.dataset.axisY),
    forecast: s.querySelector("path.forecast")?.getAttribute("d") || "",
  })));
  const fit = async () => page.evaluate(() => ({
    inner: window.innerWidth,
    scroll: document.documentElement.scrollWidth,
    right: Math.max(0, ...[...document.querySelectorAll("svg.chart")].map((s) => s.getBoundingClientRect().right)),
  }));
  for (const c of charts) {
    if (!c.unit || c.yunit !== c.unit) fail("a chart without its unit: " + JSON.stringify(c));
    if (c.xticks.length < 2 || !c.xticks.every((t) => /^\d\d:\d\d:\d\d$/.test(t))) fail("a chart without a time axis: " + JSON.stringify(c.xticks));
    if (c.yticks < 2) fail("a chart without y ticks");
    // Every forecast point at or above the axis (SVG y grows downwards).
    const ys = [...c.forecast.matchAll(/[ML][\d.]+,([\d.-]+)/g)].map((m) => Number(m[1]));
    if (ys.some((yv) => yv > c.axisY + 0.5)) fail("the forecast is drawn under the axis: " + Math.max(...ys) + " > " + c.axisY);
  }
  let f = await fit();
  if (f.right > f.inner || f.scroll > f.inner + 1) fail("a chart is wider than the window: " + JSON.stringify(f));
  // ... and follows the window when it narrows.
  await page.setViewportSize({ width: 1000, height: 1000 });
  await page.waitForTimeout(50);
  await page.waitForFunction(() => Math.max(...[...document.querySelectorAll("svg.chart")].map((s) => s.getBoundingClientRect().right)) <= window.innerWidth, null, { timeout: 5000 });
  f = await fit();
  if (f.scroll > f.inner + 1) fail("the page scrolls sideways at 1000 px: " + JSON.stringify(f));
  await page.setViewportSize({ width: 1500, height: 1000 });
  // Each node's CPU is its own processes' when measured (nodes share this host).
  const snap = await page.evaluate(async () => (await fetch("/api/snapshot")).json());
  const alive = snap.nodes.filter((n) => n.state === "alive" && n.load);
  if (!alive.length || !alive.every((n) => typeof n.load.own_cpu === "number")) fail("nodes without their own CPU: " + JSON.stringify(alive.map((n) => n.load)));
  // Failed apps: red, with restarts and the last error.
  await page.waitForSelector("#nodes .app.bad", { timeout: 30000 });
  const bad = await page.$eval("#nodes .app.bad", (e) => ({ text: e.textContent, color: getComputedStyle(e).color, node: e.closest("tr").dataset.node }));
  if (bad.color !== "rgb(248, 81, 73)") fail("a failed app is not red: " + bad.color);
  if (!/restart/.test(bad.text) || !/:/.test(bad.text)) fail("a failed app without restarts and reason: " + bad.text);
  await page.screenshot({ path: shot, fullPage: true });
  // The node detail view: its apps with last errors, and its events.
  await page.click(`#nodes tbody tr[data-node="${bad.node}"]`);
  await page.waitForSelector("#detail:not([hidden]) #detail-apps tbody tr", { timeout: 5000 });
  const detail = await page.evaluate(() => ({
    name: document.querySelector("#detail-name").textContent,
    apps: document.querySelectorAll("#detail-apps tbody tr").length,
    bad: document.querySelectorAll("#detail-apps tr.bad").length,
    events: document.querySelectorAll("#detail-events div").length,
    text: document.querySelector("#detail").textContent,
  }));
  if (detail.name !== bad.node || detail.bad < 1 || detail.events < 1) fail("node detail incomplete: " + JSON.stringify(detail));
  if (!/own processes \d+%/.test(detail.text)) fail("node detail without its own CPU: " + detail.text);
  if (nodeShot) await page.screenshot({ path: nodeShot, fullPage: true });
  if (errors.length) fail("page errors: " + errors.join("; "));
  console.log(JSON.stringify({ ok: true, rows, first, second, charts: charts.length, bad, detail: { name: detail.name, apps: detail.apps, events: detail.events }, screenshot: shot }));
} finally {
  await browser.close();
}
