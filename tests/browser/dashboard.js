// Drives the dashboard in headless Chromium (Debian's /usr/bin/chromium) for
// tests/tests/dashboard.rs, which runs it inside a lab namespace on the mesh.
//
//   node dashboard.js URL SCREENSHOT_DIR
//
// It reads one command per line on stdin and answers each with one line on stdout:
// `ok <json>` or `err <message>`. The admin token comes on stdin (never in argv).
//
//   login TOKEN                      log in through the login form
//   paths                            wait until every node lists a path to each peer; {node: {peer: text}}
//   publish EXIT PORT TARGET TPORT ALLOW   fill in and submit the publish form; the confirmation text
//   bad-allow VALUE                  submit the form with VALUE as the allow-list; the error shown next to it
//   live PORT SOURCE_PREFIX          wait until a live connection from SOURCE_PREFIX shows on PORT's rule; its row
//   recent PORT VERDICT              wait until PORT's recent audit lines show one with VERDICT; its row
//   remove-rule PORT                 remove PORT's rule (two clicks: arm, confirm); waits until it is gone
//   authkey                          create an auth key from the form; the lines shown to copy
//   screenshot NAME                  full-page PNG into SCREENSHOT_DIR/NAME.png
//   quit
'use strict';

const path = require('path');
const readline = require('readline');
const { chromium } = require(path.join(__dirname, 'node_modules', 'playwright-core'));

const [url, shots] = process.argv.slice(2);
const CHROMIUM = process.env.HOMEPORT_CHROMIUM || '/usr/bin/chromium';
const WAIT_MS = 30000;

function answer(ok, value) {
  process.stdout.write(`${ok ? 'ok' : 'err'} ${ok ? JSON.stringify(value) : String(value).replace(/\n/g, ' ')}\n`);
}

async function main() {
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const consoleErrors = [];
  // Failed requests are expected (the API's 401 before login, its 400 for a bad CIDR); a
  // script error is not.
  page.on('console', (m) => {
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) consoleErrors.push(m.text());
  });
  page.on('pageerror', (e) => consoleErrors.push(String(e)));
  await page.goto(url);
  answer(true, 'ready');

  const rl = readline.createInterface({ input: process.stdin });
  for await (const line of rl) {
    const [cmd, ...args] = line.trim().split(/\s+/);
    try {
      if (cmd === 'login') {
        await page.fill('#login-token', args[0]);
        await page.click('#login-form button[type=submit]');
        await page.waitForSelector('#app-view:not(.hidden)', { timeout: WAIT_MS });
        await page.waitForSelector('#nodes tr[data-node]', { timeout: WAIT_MS });
        answer(true, 'logged in');
      } else if (cmd === 'paths') {
        const want = Number(args[0] || 2);
        const handle = await page.waitForFunction((n) => {
          const out = {};
          const rows = document.querySelectorAll('#nodes > table > tbody > tr[data-node]');
          for (const r of rows) {
            const peers = {};
            for (const p of r.querySelectorAll('tr[data-peer]')) {
              const text = p.querySelector('td.path').textContent;
              if (text === 'no path yet') return null;
              peers[p.dataset.peer] = text;
            }
            if (Object.keys(peers).length !== n - 1) return null;
            out[r.dataset.node] = peers;
          }
          return Object.keys(out).length === n ? out : null;
        }, want, { timeout: WAIT_MS, polling: 500 });
        answer(true, await handle.jsonValue());
      } else if (cmd === 'publish' || cmd === 'bad-allow') {
        const [exit, port, target, tport, allow] = cmd === 'publish' ? args : ['', '', '', '', args[0]];
        if (cmd === 'publish') {
          await page.selectOption('#pub-exit', exit);
          await page.fill('#pub-port', port);
          await page.selectOption('#pub-target', target);
          await page.fill('#pub-target-port', tport);
        } else {
          await page.fill('#pub-port', '8000');
          await page.fill('#pub-target-port', '8000');
        }
        await page.fill('#pub-allow', (allow || '').replace(/,/g, '\n'));
        await page.click('#pub-submit');
        if (cmd === 'publish') {
          await page.waitForFunction(() => document.getElementById('pub-ok').textContent !== ''
            || document.querySelector('#publish-form .error:not(:empty)'), null, { timeout: WAIT_MS });
          const err = await page.$eval('#publish-form', (f) => [...f.querySelectorAll('.error')].map((e) => e.textContent).join(' ').trim());
          if (err) throw new Error(`the form showed an error: ${err}`);
          await page.waitForSelector(`#publish .rule[data-port="${port}"]`, { timeout: WAIT_MS });
          answer(true, await page.textContent('#pub-ok'));
        } else {
          await page.waitForFunction(() => document.getElementById('pub-allow-error').textContent !== '', null, { timeout: WAIT_MS });
          answer(true, {
            error: await page.textContent('#pub-allow-error'),
            invalid: await page.getAttribute('#pub-allow', 'aria-invalid'),
            general: await page.textContent('#pub-error'),
          });
        }
      } else if (cmd === 'live') {
        const [port, prefix] = args;
        const handle = await page.waitForFunction(([p, pre]) => {
          const rows = document.querySelectorAll(`#publish .rule[data-port="${p}"] table.live tr[data-source]`);
          for (const r of rows) if (r.dataset.source.startsWith(pre)) return [...r.cells].map((c) => c.textContent);
          return null;
        }, [port, prefix], { timeout: WAIT_MS, polling: 250 });
        answer(true, await handle.jsonValue());
      } else if (cmd === 'recent') {
        const [port, verdict] = args;
        const handle = await page.waitForFunction(([p, v]) => {
          const r = document.querySelector(`#publish .rule[data-port="${p}"] table.recent tr[data-verdict="${v}"]`);
          return r ? [...r.cells].map((c) => c.textContent) : null;
        }, [port, verdict], { timeout: WAIT_MS, polling: 250 });
        answer(true, await handle.jsonValue());
      } else if (cmd === 'remove-rule') {
        const sel = `#publish .rule[data-port="${args[0]}"] button[data-remove]`;
        await page.click(sel);
        await page.waitForFunction((s) => {
          const b = document.querySelector(s);
          return b && b.textContent.startsWith('Click again');
        }, sel, { timeout: WAIT_MS });
        await page.click(sel);
        await page.waitForSelector(`#publish .rule[data-port="${args[0]}"]`, { state: 'detached', timeout: WAIT_MS });
        answer(true, 'removed');
      } else if (cmd === 'authkey') {
        await page.click('#authkey-form button[type=submit]');
        await page.waitForSelector('#key-result:not(.hidden)', { timeout: WAIT_MS });
        answer(true, await page.textContent('#key-lines'));
      } else if (cmd === 'screenshot') {
        const file = path.join(shots, `${args[0]}.png`);
        await page.screenshot({ path: file, fullPage: true });
        answer(true, file);
      } else if (cmd === 'quit') {
        answer(true, { consoleErrors });
        break;
      } else {
        answer(false, `unknown command ${cmd}`);
      }
    } catch (e) {
      answer(false, e && e.message ? e.message : e);
    }
  }
  rl.close();
  await browser.close();
  process.exit(0);
}

main().catch((e) => { answer(false, e && e.stack ? e.stack : e); process.exit(1); });
