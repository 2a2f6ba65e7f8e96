/**
 * The agent's admin API (loopback only, default 127.0.0.1:7701): health,
 * Prometheus metrics, state, the services the registry knows, Consul's TTL
 * check endpoints, and reload with its problems returned to the caller.
 */
import type { Agent } from './agent.js';
import type { Metrics } from '../log/metrics.js';
import type { Registry, HealthStatus } from '../registry/registry.js';
import { KnitError } from '../errors.js';
import type { Route } from '../api/router.js';
import { registryRoutes } from '../api/registry-routes.js';

const CHECK_STATUS: Record<string, HealthStatus> = { pass: 'passing', warn: 'warning', fail: 'critical' };

/** Routes served by every agent (and `knit dev`), including the registry view. */
export function agentRoutes(agent: Agent, registry: Registry, metrics: Metrics): Route[] {
  return [
    ...registryRoutes(registry),
    { method: 'GET', path: '/v1/health', handler: () => ({ json: { status: 'ok' } }) },
    { method: 'GET', path: '/metrics', handler: () => ({ text: metrics.render() }) },
    { method: 'GET', path: '/v1/state', handler: () => ({ json: agent.state() }) },
    {
      method: 'GET',
      path: '/v1/flows',
      handler: () => ({ json: { node: agent.state().node, flows: agent.proxy.flows.list().map((f) => f.view()), tunnels: agent.proxy.tunnels() } }),
    },
    {
      method: 'PUT',
      path: '/v1/agent/check/:kind/:id',
      handler: (req) => {
        const status = CHECK_STATUS[req.params.kind!];
        if (!status) throw new KnitError('KNIT_ERR_NOT_FOUND', `unknown check action ${req.params.kind} (pass, warn, fail)`);
        agent.reportCheck(req.params.id!, status, req.query.get('note') ?? undefined);
        return { json: { check: req.params.id, status } };
      },
    },
    {
      method: 'POST',
      path: '/v1/agent/reload',
      handler: async () => {
        const r = await agent.reload();
        return { status: r.ok ? 200 : 400, json: r };
      },
    },
  ];
}
