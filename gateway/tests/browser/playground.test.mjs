// The playground (GET /playground) in a real browser: Debian's Chromium, headless, driven by
// playwright-core. Against a fresh embedded gateway (started by run.sh): paste a key, create a
// chat, connect, send a message and see the streamed answer, cancel a long one, drop the
// connection mid-answer and resume with last_seq, and check that what the page shows is what
// the gateway saved. Keeps a screenshot (argv[4]) as the test's artefact.
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const [base, admin, screenshot] = process.argv.slice(2);
const TIMEOUT = 20_000;

async function call(method, path, headers, body) {
  const res = await fetch(base + path, {
    method,
    headers: { "Content-Type": "application/json", ...headers },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = await res.json();
  assert.ok(res.ok, `${method} ${path}: ${res.status} ${JSON.stringify(json)}`);
  return json;
}

// A tenant whose mock model answers slowly enough to cancel and to drop mid-answer.
const tenant = await call("POST", "/admin/v1/tenants", { Authorization: `Bearer ${admin}` }, {
  name: `browser-${Date.now()}`,
  settings: { agent: { provider: "mock", options: { reply_tokens: 80, token_delay_ms: 30 } } },
});

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const problems = [];
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.setDefaultTimeout(TIMEOUT);
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => { if (m.type() === "error") problems.push(`console: ${m.text()}`); });
  await page.goto(`${base}/playground`);

  await page.getByLabel("API key or client token").fill(tenant.api_key);
  await page.getByLabel("User id").fill("browser-user");
  await page.getByRole("button", { name: "New chat", exact: true }).click();
  const chatId = await page.locator("#chat-id").filter({ hasNotText: "none" }).textContent();
  await page.getByRole("button", { name: "Connect", exact: true }).click();
  await page.locator("#status", { hasText: "connected as browser-user" }).waitFor();

  const answers = page.locator(".msg.assistant");
  const send = async (text) => {
    await page.getByLabel("Message").fill(text);
    await page.getByRole("button", { name: "Send", exact: true }).click();
  };

  // 1. A streamed answer: tokens appear while it streams, then it ends.
  await send("Hello from a real browser");
  await page.locator(".msg.assistant.streaming").first().waitFor();
  await answers.nth(0).and(page.locator("[data-done]")).waitFor({ timeout: TIMEOUT });
  assert.equal(await answers.nth(0).getAttribute("data-done"), "stop");

  // 2. Cancel a long answer: it ends as cancelled with the text so far.
  await send("Please cancel this one");
  await page.locator(".msg.assistant.streaming").waitFor();
  await page.waitForFunction(() => document.querySelectorAll(".msg.assistant")[1]?.textContent.length > 5);
  await page.getByRole("button", { name: "Cancel answer", exact: true }).click();
  await answers.nth(1).and(page.locator("[data-done]")).waitFor();
  assert.equal(await answers.nth(1).getAttribute("data-done"), "cancelled");

  // 3. Drop the connection mid-answer and resume with last_seq: no text lost.
  await send("Drop me halfway");
  await page.waitForFunction(() => document.querySelectorAll(".msg.assistant")[2]?.textContent.length > 10);
  await page.getByRole("button", { name: "Drop & resume", exact: true }).click();
  await page.locator("#status", { hasText: "connected as browser-user" }).waitFor();
  await answers.nth(2).and(page.locator("[data-done]")).waitFor();
  assert.equal(await answers.nth(2).getAttribute("data-done"), "stop");

  // The raw events carry seq, with no gap.
  const seqs = (await page.locator("#events .seq").allTextContents()).filter(Boolean).map(Number);
  assert.ok(seqs.length > 20, `seqs seen: ${seqs.length}`);

  // What the page shows is what the gateway saved.
  const saved = await call("GET", `/api/v1/chats/${chatId}/messages?limit=100`, { "X-API-Key": tenant.api_key });
  const savedAnswers = saved.messages.filter((m) => m.sender_role === "assistant").map((m) => m.content);
  const shown = await answers.evaluateAll((els) => els.map((e) => e.firstChild?.textContent ?? ""));
  assert.equal(savedAnswers.length, 3, JSON.stringify(saved));
  assert.deepEqual(shown, savedAnswers);

  // History reads the same messages back.
  await page.getByRole("button", { name: "Load history", exact: true }).click();
  await page.locator(".msg[data-done=history]").nth(2).waitFor();
  assert.equal(await page.locator(".msg.user").count(), 3);

  await page.screenshot({ path: screenshot, fullPage: true });
  assert.deepEqual(problems, []);
  console.log(`playground: streamed, cancelled and resumed answers match the saved ones (screenshot ${screenshot})`);
} finally {
  await browser.close();
}
