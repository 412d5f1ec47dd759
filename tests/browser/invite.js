// Opens an invite link in headless Chromium (Debian's /usr/bin/chromium) for
// tests/tests/exit.rs, run inside the viewer's lab namespace, then loads a URL of the published
// port as the friend's player would.
//
//   node invite.js INVITE_URL MEDIA_URL
//
// Prints one JSON line: {"status", "title", "text", "media_status", "media_bytes"}.
'use strict';

const path = require('path');
const { chromium } = require(path.join(__dirname, 'node_modules', 'playwright-core'));

const CHROMIUM = process.env.HOMEPORT_CHROMIUM || '/usr/bin/chromium';

async function main() {
  const [invite, media] = process.argv.slice(2);
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
  try {
    const page = await browser.newPage();
    const r = await page.goto(invite, { timeout: 30000 });
    const out = {
      status: r ? r.status() : 0,
      title: await page.title(),
      text: await page.innerText('body'),
      media_status: 0,
    };
    // The file would start a download in a tab: fetch it through the page's context instead.
    const m = await page.request.get(media, { timeout: 30000 });
    out.media_status = m.status();
    out.media_bytes = (await m.body()).length;
    process.stdout.write(JSON.stringify(out) + '\n');
  } finally {
    await browser.close();
  }
}

main().catch((e) => {
  process.stdout.write(JSON.stringify({ error: String(e) }) + '\n');
  process.exit(1);
});
