/**
 * The systemd units: `systemd-analyze verify` accepts them and
 * `systemd-analyze security --offline=yes` scores their exposure, next to a
 * unit shaped like Consul's packaged one (no hardening) as the baseline.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { KNIT, ROOT } from './helpers/knit.js';

const analyze = ['/usr/bin/systemd-analyze', '/bin/systemd-analyze'].find((p) => existsSync(p));

function run(args: string[]): Promise<{ code: number; out: string }> {
  return new Promise((resolve) => {
    execFile(analyze!, args, { timeout: 60_000 }, (err, stdout, stderr) => resolve({ code: err ? Number(err.code ?? 1) : 0, out: stdout + stderr }));
  });
}

/** Consul's packaged unit as shipped: a user, restart, file limit, and no hardening at all. */
const CONSUL_LIKE = `[Unit]
Description=baseline
[Service]
User=nobody
ExecStart=/bin/sleep infinity
ExecReload=/bin/kill --signal HUP $MAINPID
KillMode=process
Restart=on-failure
LimitNOFILE=65536
[Install]
WantedBy=multi-user.target
`;

async function exposure(file: string): Promise<number> {
  const r = await run(['security', '--offline=yes', file]);
  const m = /Overall exposure level for \S+: ([\d.]+)/.exec(r.out);
  assert.ok(m, r.out.slice(-500));
  return Number(m[1]);
}

for (const unit of ['knit-agent.service', 'knit-server.service']) {
  test(`${unit}: systemd-analyze verify accepts it and its exposure beats an unhardened unit`, { skip: !analyze && 'systemd-analyze is not installed (apt-get install systemd)' }, async (t) => {
    const dir = await mkdtemp(join(tmpdir(), 'knit-units-'));
    try {
      // verify checks that ExecStart exists: point it at this checkout's binary instead of the install path.
      const text = (await readFile(join(ROOT, 'systemd', unit), 'utf8')).replace('/usr/local/bin/knit', KNIT);
      assert.notEqual(text, await readFile(join(ROOT, 'systemd', unit), 'utf8'), 'ExecStart names /usr/local/bin/knit');
      const ours = join(dir, unit);
      await writeFile(ours, text);
      const v = await run(['verify', ours]);
      assert.equal(v.code, 0, v.out);
      assert.equal(v.out.split('\n').filter((l) => l.includes(unit)).join('\n'), '', 'no warnings about the unit');
      const base = join(dir, 'baseline.service');
      await writeFile(base, CONSUL_LIKE);
      const [score, baseline] = [await exposure(ours), await exposure(base)];
      t.diagnostic(`${unit} exposure ${score} vs ${baseline} for an unhardened (Consul-style) unit`);
      assert.ok(score < 2, `exposure ${score}`);
      assert.ok(score < baseline);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
}
