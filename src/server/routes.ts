/**
 * Control-plane API routes: intentions (read, change, apply a file's
 * content, check a pair) and the CA roots. `knit dev` serves them on the
 * loopback admin API; `knit server` behind authentication.
 */
import type { ControlPlane } from './control-plane.js';
import { compile, remove, sorted, upsert, type Action, type Intention } from '../policy/intentions.js';
import { field, type Route } from '../api/router.js';
import { KnitError } from '../errors.js';

function action(v: unknown): Action {
  if (v !== 'allow' && v !== 'deny') throw new KnitError('KNIT_ERR_BAD_REQUEST', '"action" must be "allow" or "deny"');
  return v;
}

export function controlPlaneRoutes(cp: ControlPlane): Route[] {
  const view = async () => {
    const { set, version } = await cp.intentions.read();
    const s = set ?? { defaultAction: 'deny' as const, intentions: [] };
    return { default: s.defaultAction, intentions: sorted(s), version };
  };
  return [
    { method: 'GET', path: '/v1/ca/roots', access: 'public', handler: () => ({ json: { trustDomain: cp.trustDomain, roots: cp.trustBundle() } }) },
    { method: 'GET', path: '/v1/intentions', access: 'agent-or-operator', handler: async () => ({ json: await view() }) },
    {
      method: 'PUT',
      path: '/v1/intentions',
      handler: async (req) => {
        const b = req.body as Record<string, unknown> | undefined;
        const i: Intention = { source: field(b, 'source'), destination: field(b, 'destination'), action: action(b?.action) };
        if (typeof b?.description === 'string') i.description = b.description;
        await cp.intentions.update((cur) => upsert(cur, i));
        return { json: await view() };
      },
    },
    {
      method: 'DELETE',
      path: '/v1/intentions',
      handler: async (req) => {
        const source = field(req.query, 'source');
        const destination = field(req.query, 'destination');
        let removed = false;
        await cp.intentions.update((cur) => {
          const r = remove(cur, source, destination);
          removed = r.removed;
          return r.set;
        });
        if (!removed) throw new KnitError('KNIT_ERR_NOT_FOUND', `no intention ${source} -> ${destination}`);
        return { json: await view() };
      },
    },
    {
      method: 'POST',
      path: '/v1/intentions/apply',
      handler: async (req) => {
        const b = req.body as { default?: unknown; intentions?: unknown } | undefined;
        if (!Array.isArray(b?.intentions)) throw new KnitError('KNIT_ERR_BAD_REQUEST', '"intentions" must be a list');
        const list = (b.intentions as Array<Record<string, unknown>>).map((x) => ({ source: field(x, 'source'), destination: field(x, 'destination'), action: action(x.action) }));
        // A whole replacement, written even over a document the control plane did not sign (the way to put that right);
        // only a file without a default needs the stored one.
        const defaultAction = b.default === undefined ? ((await cp.intentions.read()).set?.defaultAction ?? 'deny') : action(b.default);
        await cp.intentions.replace({ defaultAction, intentions: list });
        return { json: await view() };
      },
    },
    {
      method: 'GET',
      path: '/v1/intentions/check',
      access: 'agent-or-operator',
      handler: async (req) => {
        const { set } = await cp.intentions.read();
        const d = compile(set ?? { defaultAction: 'deny', intentions: [] }).evaluate(field(req.query, 'source'), field(req.query, 'destination'));
        return { json: { allow: d.allow, rule: d.rule, reason: d.reason } };
      },
    },
  ];
}
