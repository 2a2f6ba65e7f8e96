import { test } from 'node:test';
import assert from 'node:assert/strict';
import { LeafManager, renewalDelay, retryDelay, type CertSigner } from './leaf.js';
import { CertificateAuthority, createCsr } from './ca.js';
import { serviceId } from './spiffe.js';
import { certInfo } from '../identity/x509.js';
import { silentLogger } from '../log/logger.js';
import { KnitError, isKnitError } from '../errors.js';
import type { ServiceTls } from './tls.js';
import { Recorder, until } from '../../test/helpers/wait.js';

test('renewal falls between 60% and 90% of the leaf life', () => {
  const nb = new Date(0);
  const na = new Date(100_000);
  assert.equal(renewalDelay(nb, na, nb, 0), 60_000);
  assert.equal(renewalDelay(nb, na, nb, 0.5), 75_000);
  assert.ok(Math.abs(renewalDelay(nb, na, nb, 0.999999) - 90_000) < 1);
  for (let i = 0; i < 1000; i++) {
    const d = renewalDelay(nb, na, new Date(10_000), Math.random());
    assert.ok(d >= 50_000 && d <= 80_000);
  }
  assert.equal(renewalDelay(nb, na, new Date(95_000), 0.5), 0, 'overdue renews at once');
});

test('retry backoff doubles from 1s, caps at a minute and at a tenth of the time left', () => {
  assert.equal(retryDelay(0, 3600_000), 1000);
  assert.equal(retryDelay(3, 3600_000), 8000);
  assert.equal(retryDelay(20, 3600_000), 60_000);
  assert.equal(retryDelay(20, 100_000), 10_000);
  assert.equal(retryDelay(20, 0), 1000);
});

test('a leaf manager issues with an agent-made key and refuses a leaf for another identity', async () => {
  const ca = await CertificateAuthority.create('t.knit');
  const id = serviceId('t.knit', 'web');
  const signer: CertSigner = {
    signService: async (_svc, csr) => ca.signCsr(csr, id),
    trustBundle: async () => [ca.rootPem],
  };
  const m = new LeafManager({ id, service: 'web', sign: (csr) => signer.signService('web', csr), trustBundle: () => signer.trustBundle(), log: silentLogger(), onRenewed: () => undefined, schedule: () => ({ cancel: () => undefined }) });
  const first = await m.start();
  assert.deepEqual(certInfo(first.certChainPem).uris, [id.uri]);
  assert.deepEqual(first.trustBundlePem, [ca.rootPem]);
  const second = await m.issue();
  assert.notEqual(second.keyPem, first.keyPem, 'a new key per leaf');
  m.stop();

  // A control plane that returns a leaf for another identity is refused.
  const wrong: CertSigner = { signService: async () => ca.signCsr((await createCsr(serviceId('t.knit', 'db'))).csrPem, serviceId('t.knit', 'db')), trustBundle: async () => [ca.rootPem] };
  const bad = new LeafManager({ id, service: 'web', sign: (csr) => wrong.signService('web', csr), trustBundle: () => wrong.trustBundle(), log: silentLogger(), onRenewed: () => undefined });
  await assert.rejects(bad.start(), (e: unknown) => isKnitError(e, 'KNIT_ERR_CERT') && /names spiffe:\/\/t\.knit\/ns\/default\/svc\/db/.test(e.message));
});

/**
 * A leaf manager on a clock and a scheduler the test drives: `fire()` moves
 * the clock to the pending renewal and runs it, so a leaf's whole life
 * passes in no time. The CA signs hour-long leaves at the test's clock.
 */
async function drivenLeafManager() {
  const ca = await CertificateAuthority.create('t.knit');
  const id = serviceId('t.knit', 'web');
  let now = Date.now();
  let failSigns = 0;
  const pending: Array<{ fn: () => void; at: number; cancelled: boolean }> = [];
  const renewed = new Recorder<ServiceTls>();
  const persisted: ServiceTls[] = [];
  const m = new LeafManager({
    id,
    service: 'web',
    sign: async (csr) => {
      if (failSigns > 0) {
        failSigns--;
        throw new KnitError('KNIT_ERR_SERVER_UNAVAILABLE', 'control plane away');
      }
      return ca.signCsr(csr, id, { now: new Date(now), ttlMs: 3600_000 });
    },
    trustBundle: async () => [ca.rootPem],
    persist: async (t) => void persisted.push(t),
    log: silentLogger(),
    onRenewed: renewed.push,
    random: () => 0,
    now: () => new Date(now),
    schedule: (fn, ms) => {
      const timer = { fn, at: now + ms, cancelled: false };
      pending.push(timer);
      return { cancel: () => void (timer.cancelled = true) };
    },
  });
  return {
    m,
    renewed,
    persisted,
    /** Makes the next `n` signing requests fail as an unreachable control plane. */
    failNextSigns(n: number): void {
      failSigns = n;
    },
    /** The one live timer: when it is due (epoch ms), and in how long from the clock's now. */
    next(): { at: number; inMs: number } {
      const live = pending.filter((p) => !p.cancelled);
      assert.equal(live.length, 1, 'exactly one renewal scheduled');
      return { at: live[0]!.at, inMs: live[0]!.at - now };
    },
    /** Moves the clock to the live timer and runs it. */
    fire(): void {
      const live = pending.filter((p) => !p.cancelled);
      assert.equal(live.length, 1, 'exactly one renewal scheduled');
      const t = live[0]!;
      t.cancelled = true;
      now = t.at;
      t.fn();
    },
  };
}

/** 60% into a leaf's life: where renewal falls when random() is 0. */
const sixtyPercent = (i: { notBefore: Date; notAfter: Date }): number => i.notBefore.getTime() + 0.6 * (i.notAfter.getTime() - i.notBefore.getTime());

test('a leaf manager renews at 60-90% of the leaf\'s life to a new key and a later notAfter, and hands it to onRenewed', async () => {
  const d = await drivenLeafManager();
  const first = await d.m.start();
  const firstInfo = certInfo(first.certChainPem);
  assert.equal(d.next().at, sixtyPercent(firstInfo));
  assert.ok(d.next().inMs > 30 * 60_000, 'not before half an hour into an hour-long leaf');
  assert.equal(d.renewed.values.length, 0, 'nothing renewed before its time');
  d.fire();
  const second = await d.renewed.next('first renewal', () => true);
  const secondInfo = certInfo(second.certChainPem);
  assert.notEqual(second.keyPem, first.keyPem, 'a new key');
  assert.notEqual(secondInfo.serial, firstInfo.serial);
  assert.ok(secondInfo.notAfter > firstInfo.notAfter, `renewed leaf ends later (${secondInfo.notAfter.toISOString()} > ${firstInfo.notAfter.toISOString()})`);
  assert.deepEqual(secondInfo.uris, firstInfo.uris);
  assert.equal(d.m.current, second, 'the manager serves the renewed leaf');
  assert.equal(d.m.expires.getTime(), secondInfo.notAfter.getTime());
  assert.equal(d.persisted.at(-1), second, 'stored before it is used');
  // And again, from the renewed leaf's own life.
  assert.equal(d.next().at, sixtyPercent(secondInfo));
  d.fire();
  const third = await d.renewed.next('second renewal', () => true, 5000, 1);
  assert.ok(certInfo(third.certChainPem).notAfter > secondInfo.notAfter);
  d.m.stop();
});

test('a failed renewal is retried with backoff, keeping the old leaf until a retry renews it', async () => {
  const d = await drivenLeafManager();
  const first = await d.m.start();
  d.failNextSigns(2);
  d.fire();
  // Failed: retried after 1 s (retryDelay(0)), then 2 s; the old leaf is served meanwhile.
  await until('first retry scheduled', () => d.next().inMs === 1000);
  d.fire();
  await until('second retry scheduled', () => d.next().inMs === 2000);
  assert.equal(d.m.current, first);
  assert.equal(d.renewed.values.length, 0);
  d.fire();
  const renewed = await d.renewed.next('renewed by the retry', () => true);
  const info = certInfo(renewed.certChainPem);
  assert.ok(info.notAfter > certInfo(first.certChainPem).notAfter);
  assert.equal(d.next().at, sixtyPercent(info), 'back to the normal schedule');
  d.m.stop();
});
