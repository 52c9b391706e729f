// Drives a real JupyterLab in Debian's headless Chromium (playwright-core, no browser
// download): runs every cell of the notebook, then uses the tree view's buttons.
// Usage: node drive.mjs URL ARTIFACT_DIR. Prints one JSON object of observations on
// stdout; the pytest side checks them and the store file. Exits 1 on a failed step.
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const [url, artifacts] = process.argv.slice(2);
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const LONG_WORDS = Number(process.env.LONG_WORDS || 400);
fs.mkdirSync(artifacts, { recursive: true });
const started = Date.now();
const log = (...a) => console.error(`[${((Date.now() - started) / 1000).toFixed(1)}s]`, ...a);
const out = { steps: [] };

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function until(what, fn, timeout = 20000, every = 50) {
  const deadline = Date.now() + timeout;
  let last;
  while (Date.now() < deadline) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    await sleep(every);
  }
  throw new Error(`timed out waiting for ${what} (last: ${last})`);
}

const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'subchat-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath,
  headless: true,
  viewport: { width: 1280, height: 900 },
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run',
    '--disable-dev-shm-usage'],
});
const page = context.pages()[0] || (await context.newPage());
const consoleLines = [];
page.on('console', (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
page.on('pageerror', (e) => consoleLines.push(`pageerror: ${e}`));

async function shot(name, locator) {
  const file = path.join(artifacts, name);
  await (locator || page).screenshot({ path: file });
  log('screenshot', file);
}

const view = page.locator('.subchat-view').last();
const optionTexts = () => view.locator('.subchat-tree select option').allInnerTexts();
const streamText = async () => {
  const pane = view.locator('.subchat-stream');
  return (await pane.count()) ? (await pane.first().innerText()) : '';
};
const statusText = () => view.locator('.subchat-status').innerText();
const assistantTexts = () => view.locator('.subchat-msg-assistant').allInnerTexts();

async function promptStates() {
  return page.locator('.jp-CodeCell .jp-InputPrompt').allInnerTexts();
}

async function kernelIdle() {
  // the server has a kernel for the notebook and it is idle, and so says the toolbar
  const api = new URL(url);
  const res = await fetch(`${api.origin}/api/sessions?token=${api.searchParams.get('token')}`);
  const sessions = res.ok ? await res.json() : [];
  if (!sessions.some((s) => s.kernel && s.kernel.execution_state === 'idle')) return false;
  const ind = page.locator('.jp-NotebookPanel-toolbar .jp-Notebook-ExecutionIndicator');
  return (await ind.count()) > 0 && (await ind.first().getAttribute('data-status')) === 'idle';
}

async function runAll() {
  for (let attempt = 1; attempt <= 5; attempt++) {
    await page.locator('.lm-MenuBar-itemLabel', { hasText: /^Run$/ }).click();
    await page.locator('.lm-Menu-itemLabel', { hasText: /^Run All Cells$/ }).click();
    try {
      // the pitfall: right after the kernel says idle, Run All can do nothing
      await until('a cell to start', async () =>
        (await promptStates()).some((p) => /\[(\*|\d+)\]/.test(p)), 4000);
      out.steps.push(`run all (attempt ${attempt})`);
      log(`cells started (attempt ${attempt})`);
      return;
    } catch {
      log(`Run All did nothing (attempt ${attempt}); again`);
    }
  }
  throw new Error('Run All Cells never started the cells');
}

// click, then wait for the effect that proves the kernel handled it; click again if not
async function clickUntil(what, locator, done, tries = 3, timeout = 8000) {
  for (let attempt = 1; attempt <= tries; attempt++) {
    await locator.click();
    try {
      return await until(what, done, timeout);
    } catch (e) {
      log(`${what}: no effect after click ${attempt}`);
      if (attempt === tries) throw e;
    }
  }
}

try {
  log('open', url.replace(/token=[^&]+/, 'token=…'));
  await page.goto(url, { waitUntil: 'domcontentloaded' });
  await until('the notebook', async () => (await page.locator('.jp-Notebook').count()) > 0, 60000);
  // a notebook never run here asks which kernel to start
  await until('a kernel (or the kernel dialog)', async () => {
    const dialog = page.locator('.jp-Dialog', { hasText: 'Select Kernel' });
    if (await dialog.count()) {
      await dialog.locator('.jp-Dialog-footer .jp-mod-accept').click();
      out.steps.push('kernel dialog');
      return false;
    }
    return await kernelIdle();
  }, 60000, 100);
  out.steps.push('kernel idle');
  log('kernel idle');

  await runAll();
  // while the cells run, the last one streams a reply into the open view: record its texts
  const seen = [];
  await until('every cell to finish', async () => {
    const t = await streamText();
    if (t && t !== seen[seen.length - 1]) seen.push(t);
    const prompts = await promptStates();
    return prompts.length > 0 && prompts.every((p) => /\[\d+\]/.test(p)) && (await kernelIdle());
  }, 90000, 25);
  out.cellStreamTexts = seen;
  out.labelsAfterRun = await optionTexts();
  out.assistantAfterRun = await assistantTexts();
  log('cells done; stream texts seen:', seen.length);
  await shot('after-run-all.png');

  // Send: continue the selected chat
  const input = view.locator('.subchat-input textarea');
  await input.fill('Send from the browser');
  await clickUntil('Send to be heard', view.locator('button.subchat-send'),
    async () => (await input.inputValue()) === '');
  await until('the reply to Send', async () =>
    (await assistantTexts()).some((t) => t.includes('Send from the browser')));
  out.labelsAfterSend = await optionTexts();
  out.steps.push('send');

  // Branch: a named subchat under the selected chat, with a first message
  await view.locator('.subchat-branch-name input').fill('from-browser');
  await input.fill('a question on a branch');
  await clickUntil('Branch to be heard', view.locator('button.subchat-branch'),
    async () => (await optionTexts()).some((t) => t.includes('from-browser')));
  await until('the reply in the branch', async () =>
    (await assistantTexts()).some((t) => t.includes('a question on a branch')));
  out.labelsAfterBranch = await optionTexts();
  out.headAfterBranch = await view.locator('.subchat-transcript-head').first().innerText();
  out.steps.push('branch');

  // Stop: a long reply, stopped mid-way
  const words = Array.from({ length: LONG_WORDS }, (_, i) => `word${i}`).join(' ');
  await input.fill(words);
  await clickUntil('Send (long) to be heard', view.locator('button.subchat-send'),
    async () => (await input.inputValue()) === '');
  const midway = [];
  await until('the long reply to stream a while', async () => {
    const t = await streamText();
    if (t && t !== midway[midway.length - 1]) midway.push(t);
    return (t.match(/word\d+/g) || []).length >= 25;
  }, 30000, 25);
  out.stopStreamTexts = midway.length;
  out.labelsMidStream = await optionTexts();
  await shot('widget-streaming.png', view);
  await clickUntil('Stop to be heard', view.locator('button.subchat-stop'),
    async () => /interrupted/.test(await statusText()));
  await until('the stream pane to go', async () => (await streamText()) === '');
  out.statusAfterStop = await statusText();
  out.assistantAfterStop = await assistantTexts();
  out.labelsAfterStop = await optionTexts();
  out.steps.push('stop');

  // the finished tree, with provenance shown
  await view.locator('.subchat-tree select').selectOption({ index: 1 });
  await until('root/physics shown', async () =>
    (await view.locator('.subchat-transcript-head').first().innerText()).includes('root/physics'));
  await clickUntil('provenance to show', view.locator('button.subchat-provenance'),
    async () => (await view.locator('.subchat-msg-assistant blockquote').count()) > 0);
  await sleep(300);
  out.labelsFinal = await optionTexts();
  await shot('widget-tree.png', view);
  await shot('final-page.png');

  // a reply's code blocks, copied to the clipboard by the button under it
  await context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: new URL(url).origin });
  await input.fill("Copy this:\n```python\nprint('copied')\n```");
  await clickUntil('Send (code) to be heard', view.locator('button.subchat-send'),
    async () => (await input.inputValue()) === '');
  await until('the copy button', async () => (await view.locator('button.subchat-copy-code').count()) > 0);
  await view.locator('button.subchat-copy-code').last().click();
  await until('the clipboard', async () =>
    (await page.evaluate(() => navigator.clipboard.readText())) !== '');
  out.clipboard = await page.evaluate(() => navigator.clipboard.readText());
  out.steps.push('copy code');

  // saved, its kernel gone, reopened: the tree is still there as text (JupyterLab saves no
  // widget state by default, so the view itself cannot come back)
  const api = new URL(url);
  const token = api.searchParams.get('token');
  const nbPath = decodeURIComponent(api.pathname.replace(/^\/lab\/tree\//, ''));
  const contents = `${api.origin}/api/contents/${nbPath}?token=${token}`;
  await page.locator('.jp-Notebook .jp-InputPrompt').first().click();
  await clickUntil('the notebook to be saved', page.locator('.lm-MenuBar-itemLabel', { hasText: /^File$/ }),
    async () => {
      const item = page.locator('.lm-Menu-itemLabel', { hasText: /^Save Notebook$/ });
      if (await item.count()) await item.first().click();
      const saved = await (await fetch(contents)).json();
      return JSON.stringify(saved.content || '').includes('subchat-tree-static');
    }, 3, 10000);
  for (const s of await (await fetch(`${api.origin}/api/sessions?token=${token}`)).json()) {
    await fetch(`${api.origin}/api/sessions/${s.id}?token=${token}`, { method: 'DELETE' });
  }
  out.steps.push('saved, kernel shut down');
  await page.goto(url, { waitUntil: 'domcontentloaded' });
  await until('the reopened notebook', async () => (await page.locator('.jp-Notebook .jp-OutputArea-output').count()) > 3, 60000);
  const staticTree = page.locator('.subchat-tree-static').last();
  await until('the static tree', async () => (await staticTree.count()) > 0 && (await staticTree.isVisible()), 30000);
  out.reopenedStatic = await staticTree.innerText();
  out.reopenedLiveViews = await page.locator('.subchat-view').count();
  await staticTree.scrollIntoViewIfNeeded();
  await shot('reopened-without-the-view.png');
  out.steps.push('reopened');
  out.ok = true;
} catch (e) {
  out.ok = false;
  out.error = String(e && e.stack || e);
  log('FAILED:', out.error);
  try { await shot('failure.png'); } catch {}
} finally {
  fs.writeFileSync(path.join(artifacts, 'console.log'), consoleLines.join('\n'));
  await context.close();
  fs.rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(out));
process.exit(out.ok ? 0 : 1);
