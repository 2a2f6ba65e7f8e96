/**
 * The Registry contract as a test suite. Every backend runs it:
 * `registryContract('zookeeper', makeBackend)`. A backend that cannot run
 * here passes `skip` with a one-line reason, which node:test prints.
 *
 * Beyond the happy path it holds every backend to its promises under
 * faults, where the backend has a link to lose (`partitioned`): nothing
 * written while cut off is lost, no instance stays gone or stale after the
 * link heals, no watch goes deaf, and onResync says when instances were
 * written again.
 */
import { test, describe, after, before } from 'node:test';
import assert from 'node:assert/strict';
import type { Instance, KvEntry, Registry } from './registry.js';
import { isKnitError } from '../errors.js';
import { Recorder, until } from '../../test/helpers/wait.js';

/** What a backend gives the suite. */
export interface ContractBackend {
  /** A new, independent client of the same registry. */
  client(): Promise<Registry>;
  /**
   * Registers `instance` from a separate owner (another process) and
   * returns a function that kills that owner without a clean close (a
   * crash). Absent when the backend cannot outlive its owner's process.
   */
  spawnOwner?(instance: Instance): Promise<() => Promise<void>>;
  /** Drops every client and the backend's process state, then opens the same registry again. */
  reopen?(): Promise<void>;
  /** How long a killed owner's instances may take to vanish. */
  livenessTimeoutMs?: number;
  /**
   * A new client whose link to the backend the suite can cut (every
   * connection reset, new ones refused) and heal, for the fault tests.
   * Absent when the backend lives in its clients' process: there is no
   * link to cut.
   */
  partitioned?(): Promise<Partitioned>;
  cleanup(): Promise<void>;
}

/** A client behind a link the suite cuts and heals. */
export interface Partitioned {
  client: Registry;
  cut(): void;
  heal(): void;
}

let seq = 0;
const inst = (service: string, n: number, extra: Partial<Instance> = {}): Instance => ({
  id: `node${n}/${service}`,
  service,
  node: `node${n}`,
  address: `10.0.0.${n}`,
  port: 21000 + n,
  tags: ['t'],
  meta: { k: 'v' },
  health: 'passing',
  ...extra,
});

/** Runs the contract against a backend. */
export function registryContract(name: string, make: () => Promise<ContractBackend>, opts: { skip?: string } = {}): void {
  describe(`Registry contract: ${name}`, { skip: opts.skip }, () => {
    let backend: ContractBackend;
    const clients: Registry[] = [];
    const client = async (): Promise<Registry> => {
      const c = await backend.client();
      clients.push(c);
      return c;
    };
    // Each test uses its own service and key names so that tests never see each other's data.
    const svc = (): string => `svc-${process.pid}-${++seq}`;

    before(async () => {
      backend = await make();
    });
    after(async () => {
      for (const c of clients) await c.close().catch(() => undefined);
      await backend.cleanup();
    });

    test('a registered instance is delivered to a watcher on another client', async () => {
      const [a, b] = [await client(), await client()];
      const s = svc();
      const rec = new Recorder<Instance[]>();
      const w = b.watchService(s, rec.push);
      await rec.next('empty first snapshot', (l) => l.length === 0);
      await a.register(inst(s, 1));
      const [got] = await rec.next('instance', (l) => l.length === 1);
      assert.deepEqual(got, inst(s, 1));
      await a.register(inst(s, 2));
      await rec.next('two instances sorted', (l) => l.length === 2 && l[0]!.id < l[1]!.id);
      w.close();
    });

    test('critical instances leave the watched set and come back when passing; warning stays', async () => {
      const [a, b] = [await client(), await client()];
      const s = svc();
      await a.register(inst(s, 1));
      await a.register(inst(s, 2));
      const rec = new Recorder<Instance[]>();
      const w = b.watchService(s, rec.push);
      await rec.next('two', (l) => l.length === 2);
      await a.setHealth(inst(s, 1).id, 'critical');
      const one = await rec.next('one left', (l) => l.length === 1);
      assert.equal(one[0]!.id, inst(s, 2).id);
      assert.equal((await b.instances(s)).find((i) => i.id === inst(s, 1).id)?.health, 'critical');
      await a.setHealth(inst(s, 1).id, 'warning');
      await rec.next('back as warning', (l) => l.length === 2 && l.some((i) => i.id === inst(s, 1).id && i.health === 'warning'));
      w.close();
    });

    test('deregister removes an instance; a second deregister is fine', async () => {
      const [a, b] = [await client(), await client()];
      const s = svc();
      await a.register(inst(s, 1));
      const rec = new Recorder<Instance[]>();
      const w = b.watchService(s, rec.push);
      await rec.next('one', (l) => l.length === 1);
      await a.deregister(inst(s, 1).id);
      await rec.next('gone', (l) => l.length === 0, 5000, 1);
      await a.deregister(inst(s, 1).id);
      assert.deepEqual(await b.instances(s), []);
      w.close();
    });

    test('re-registering replaces the instance in place', async () => {
      const a = await client();
      const s = svc();
      await a.register(inst(s, 1));
      await a.register(inst(s, 1, { port: 30001, tags: ['v2'] }));
      const list = await a.instances(s);
      assert.equal(list.length, 1);
      assert.equal(list[0]!.port, 30001);
      assert.deepEqual(list[0]!.tags, ['v2']);
    });

    test('setHealth on an unknown instance rejects KNIT_ERR_NOT_FOUND', async () => {
      const a = await client();
      await assert.rejects(a.setHealth(`nobody/${svc()}`, 'passing'), (e: unknown) => isKnitError(e, 'KNIT_ERR_NOT_FOUND'));
    });

    test('evict removes another client\'s instance and watchers see it go; an absent one is fine', async () => {
      const [a, b, c] = [await client(), await client(), await client()];
      const s = svc();
      await a.register(inst(s, 1));
      await a.register(inst(s, 2));
      const rec = new Recorder<Instance[]>();
      const w = c.watchService(s, rec.push);
      await rec.next('two', (l) => l.length === 2);
      await b.evict(s, inst(s, 1).id);
      const left = await rec.next('evicted one gone', (l) => l.length === 1);
      assert.equal(left[0]!.id, inst(s, 2).id);
      assert.deepEqual((await c.instances(s)).map((i) => i.id), [inst(s, 2).id]);
      // Absent, an unknown service, or the right id under another service: nothing happens.
      await b.evict(s, inst(s, 1).id);
      await b.evict(svc(), 'nobody/x');
      await b.evict(svc(), inst(s, 2).id);
      assert.deepEqual((await c.instances(s)).map((i) => i.id), [inst(s, 2).id]);
      // The owner can still deregister (a no-op) and close cleanly.
      await a.deregister(inst(s, 1).id);
      await a.close();
      await rec.next('owner closed', (l) => l.length === 0);
      w.close();
    });

    test('a closed watch delivers nothing more, for services and keys', async () => {
      const [a, b] = [await client(), await client()];
      const s = svc();
      const key = `test/${svc()}`;
      const closedS = new Recorder<Instance[]>();
      const liveS = new Recorder<Instance[]>();
      const closedK = new Recorder<KvEntry | undefined>();
      const liveK = new Recorder<KvEntry | undefined>();
      const ws = b.watchService(s, closedS.push);
      const ls = b.watchService(s, liveS.push);
      const wk = b.watchKey(key, closedK.push);
      const lk = b.watchKey(key, liveK.push);
      await closedS.next('first service snapshot', (l) => l.length === 0);
      await liveS.next('first service snapshot (live)', (l) => l.length === 0);
      await closedK.next('first key value', (e) => e === undefined);
      await liveK.next('first key value (live)', (e) => e === undefined);
      ws.close();
      wk.close();
      const [seenS, seenK] = [closedS.values.length, closedK.values.length];
      await a.register(inst(s, 1));
      await a.kvSet(key, 'after close');
      // A live watch on the same client sees each change: the closed ones had the same chance.
      await liveS.next('live service watch sees the change', (l) => l.length === 1);
      await liveK.next('live key watch sees the change', (e) => e?.value === 'after close');
      // The one bounded wait in the suite: that something does NOT happen can only be shown
      // over a window. The live watches above already got the change, so 300 ms more only
      // covers a delivery still in flight; a leaking backend delivers within it.
      await Promise.all([
        assert.rejects(closedS.next('service delivery after close', () => true, 300, seenS), /timed out/),
        assert.rejects(closedK.next('key delivery after close', () => true, 300, seenK), /timed out/),
      ]);
      ls.close();
      lk.close();
    });

    test('listServices counts instances and routable ones', async () => {
      const a = await client();
      const s = svc();
      await a.register(inst(s, 1));
      await a.register(inst(s, 2, { health: 'critical' }));
      const got = (await a.listServices()).find((x) => x.name === s);
      assert.deepEqual(got, { name: s, instances: 2, routable: 1 });
    });

    test('closing a client removes its instances, not other clients\'', async () => {
      const [a, b, c] = [await client(), await client(), await client()];
      const s = svc();
      await a.register(inst(s, 1));
      await b.register(inst(s, 2));
      const rec = new Recorder<Instance[]>();
      c.watchService(s, rec.push);
      await rec.next('two', (l) => l.length === 2);
      await a.close();
      const left = await rec.next('one left', (l) => l.length === 1);
      assert.equal(left[0]!.node, 'node2');
    });

    test('a crashed owner\'s instances vanish within the liveness timeout', async (t) => {
      if (!backend.spawnOwner) return t.skip(`${name} keeps instances in the owner's own process: a crash takes the whole registry with it`);
      const b = await client();
      const s = svc();
      const rec = new Recorder<Instance[]>();
      b.watchService(s, rec.push);
      const kill = await backend.spawnOwner(inst(s, 1));
      await rec.next('registered by the other process', (l) => l.length === 1);
      const seen = rec.values.length;
      const t0 = Date.now();
      await kill();
      await rec.next('vanished', (l) => l.length === 0, backend.livenessTimeoutMs ?? 5000, seen);
      t.diagnostic(`instances of a SIGKILLed owner vanished after ${Date.now() - t0} ms`);
    });

    test('an id registered by another client is taken over; closing the old client leaves it', async () => {
      const [a, b] = [await client(), await client()];
      const s = svc();
      await a.register(inst(s, 1));
      await b.register(inst(s, 1, { port: 30002 }));
      await a.close();
      await until('taken over', async () => {
        const l = await b.instances(s);
        return l.length === 1 && l[0]!.port === 30002;
      });
      await b.setHealth(inst(s, 1).id, 'warning');
      assert.equal((await b.instances(s))[0]!.health, 'warning');
    });

    test('kv: create-only, compare-and-set, conflicts, delete', async () => {
      const [a, b] = [await client(), await client()];
      const key = `test/${svc()}`;
      assert.equal(await a.kvGet(key), undefined);
      const v1 = await a.kvSet(key, 'one', 0);
      assert.ok(v1 > 0);
      await assert.rejects(b.kvSet(key, 'again', 0), (e: unknown) => isKnitError(e, 'KNIT_ERR_CAS_CONFLICT') && e.retryable);
      const v2 = await b.kvSet(key, 'two', v1);
      assert.notEqual(v2, v1);
      await assert.rejects(a.kvSet(key, 'stale', v1), (e: unknown) => isKnitError(e, 'KNIT_ERR_CAS_CONFLICT'));
      assert.deepEqual(await a.kvGet(key), { value: 'two', version: v2 });
      const v3 = await a.kvSet(key, 'three');
      assert.equal((await b.kvGet(key))?.value, 'three');
      await assert.rejects(a.kvDelete(key, v2), (e: unknown) => isKnitError(e, 'KNIT_ERR_CAS_CONFLICT'));
      await a.kvDelete(key, v3);
      assert.equal(await b.kvGet(key), undefined);
      await a.kvDelete(key);
    });

    test('kv: concurrent compare-and-set lets exactly one writer win', async () => {
      const clientsN = await Promise.all([client(), client(), client(), client()]);
      const key = `test/${svc()}`;
      const v = await clientsN[0].kvSet(key, '0', 0);
      const results = await Promise.allSettled(clientsN.map((c, i) => c.kvSet(key, String(i), v)));
      assert.equal(results.filter((r) => r.status === 'fulfilled').length, 1);
    });

    test('kv: values up to 256 KiB and any text round-trip', async () => {
      const a = await client();
      const key = `test/${svc()}`;
      const big = 'é\n"{}'.repeat(50_000);
      await a.kvSet(key, big);
      assert.equal((await a.kvGet(key))?.value, big);
    });

    test('kv: a watcher sees the current value, each change and the delete', async () => {
      const [a, b] = [await client(), await client()];
      const key = `test/${svc()}`;
      await a.kvSet(key, 'first');
      const rec = new Recorder<KvEntry | undefined>();
      const w = b.watchKey(key, rec.push);
      await rec.next('current', (e) => e?.value === 'first');
      await a.kvSet(key, 'second');
      await rec.next('change', (e) => e?.value === 'second');
      await a.kvDelete(key);
      await rec.next('delete', (e) => e === undefined);
      w.close();
      await a.kvSet(key, 'after close');
      await until('kv write visible', async () => (await a.kvGet(key))?.value === 'after close');
      assert.ok(!rec.values.some((e) => e?.value === 'after close'), 'no delivery after close');
    });

    test('kv survives reopening the registry; instances do not', async (t) => {
      if (!backend.reopen) return t.skip(`${name} has no reopen`);
      const a = await client();
      const key = `test/${svc()}`;
      const s = svc();
      await a.kvSet(key, 'durable');
      await a.register(inst(s, 1));
      await backend.reopen();
      const b = await client();
      assert.equal((await b.kvGet(key))?.value, 'durable');
      await until('instances gone after reopen', async () => (await b.instances(s)).length === 0, backend.livenessTimeoutMs ?? 5000);
    });

    test('onResync is implemented and returns an unsubscribe', async () => {
      const a = await client();
      assert.equal(typeof a.onResync, 'function', `${name} must implement onResync`);
      const off = a.onResync!(() => undefined);
      assert.equal(typeof off, 'function');
      off();
      off();
    });

    // ---- faults: a client cut off from the backend and healed ----------------

    const partitioned = async (t: { skip(why: string): void }): Promise<Partitioned | undefined> => {
      if (!backend.partitioned) {
        t.skip(`${name} lives in its clients' process: there is no link to cut`);
        return undefined;
      }
      const p = await backend.partitioned();
      clients.push(p.client);
      return p;
    };

    test('a client cut off until it loses its instances registers them again, with their latest health, then tells onResync', async (t) => {
      const p = await partitioned(t);
      if (!p) return;
      const b = await client();
      const s = svc();
      await p.client.register(inst(s, 1));
      await p.client.setHealth(inst(s, 1).id, 'warning');
      const resynced = new Recorder<Instance[]>();
      p.client.onResync!(() => void b.instances(s).then(resynced.push));
      const rec = new Recorder<Instance[]>();
      b.watchService(s, rec.push);
      await rec.next('registered', (l) => l.length === 1 && l[0]!.health === 'warning');
      p.cut();
      await rec.next('gone with the lost link', (l) => l.length === 0, (backend.livenessTimeoutMs ?? 5000) * 3);
      const from = rec.values.length;
      p.heal();
      await rec.next('back by itself, as last asked', (l) => l.length === 1 && l[0]!.health === 'warning', 30_000, from);
      const seen = await resynced.next('onResync, once they are back', () => true, 30_000);
      assert.deepEqual(seen.map((i) => [i.id, i.health]), [[inst(s, 1).id, 'warning']]);
    });

    test('writes made while cut off are not lost: once healed the backend holds the latest of each', async (t) => {
      const p = await partitioned(t);
      if (!p) return;
      const b = await client();
      const s = svc();
      await p.client.register(inst(s, 1));
      await p.client.register(inst(s, 3));
      const rec = new Recorder<Instance[]>();
      b.watchService(s, rec.push);
      await rec.next('two', (l) => l.length === 2);
      p.cut();
      const writes = [p.client.setHealth(inst(s, 1).id, 'warning'), p.client.register(inst(s, 2)), p.client.deregister(inst(s, 3).id)];
      // Cut long enough for the backend to drop the client's instances: the writes cannot have reached it.
      await rec.next('gone with the lost link', (l) => l.length === 0, (backend.livenessTimeoutMs ?? 5000) * 3);
      const from = rec.values.length;
      p.heal();
      // Each write resolves, or rejects as retryable; either way it is not forgotten.
      for (const r of await Promise.allSettled(writes)) {
        if (r.status === 'rejected') assert.ok(isKnitError(r.reason, 'KNIT_ERR_REGISTRY_UNAVAILABLE') && r.reason.retryable, String(r.reason));
      }
      const want = [[inst(s, 1).id, 'warning'], [inst(s, 2).id, 'passing']];
      await rec.next('the latest of each write', (l) => JSON.stringify(l.map((i) => [i.id, i.health])) === JSON.stringify(want), 30_000, from);
    });

    test('a watch on a client cut off and healed keeps delivering, after a short cut and after one that lost its instances', async (t) => {
      const p = await partitioned(t);
      if (!p) return;
      const a = await client();
      const s = svc();
      // The watching client owns an instance too, so that the suite sees when a cut has cost it its instances (and session).
      const marker = svc();
      await p.client.register(inst(marker, 9));
      const markers = new Recorder<Instance[]>();
      a.watchService(marker, markers.push);
      await markers.next('marker registered', (l) => l.length === 1);
      const rec = new Recorder<Instance[]>();
      const errors = new Recorder<Error>();
      p.client.watchService(s, rec.push, errors.push);
      await rec.next('empty first snapshot', (l) => l.length === 0);

      p.cut();
      await errors.next('told it is cut off', () => true, 10_000);
      await a.register(inst(s, 1));
      p.heal();
      await rec.next('the change made while cut off', (l) => l.length === 1, 30_000);
      await a.register(inst(s, 2));
      await rec.next('a change after', (l) => l.length === 2, 10_000);

      p.cut();
      await markers.next('the cut client lost its instances', (l) => l.length === 0, (backend.livenessTimeoutMs ?? 5000) * 3, markers.values.length);
      await a.setHealth(inst(s, 1).id, 'critical');
      const lost = markers.values.length;
      p.heal();
      await rec.next('the change made during the long cut', (l) => l.length === 1 && l[0]!.id === inst(s, 2).id, 30_000);
      await a.setHealth(inst(s, 1).id, 'passing');
      await rec.next('and one after it', (l) => l.length === 2, 10_000);
      await markers.next('marker back', (l) => l.length === 1, 30_000, lost);
    });

    test('a closed client rejects with KNIT_ERR_CLOSED', async () => {
      const a = await client();
      await a.close();
      await a.close();
      await assert.rejects(a.kvGet('x'), (e: unknown) => isKnitError(e, 'KNIT_ERR_CLOSED'));
    });
  });
}
