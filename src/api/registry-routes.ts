/** The registry's view of services and instances, served by agents, `knit dev` and the control plane. */
import type { Registry } from '../registry/registry.js';
import type { Route } from './router.js';

export function registryRoutes(registry: Registry): Route[] {
  return [
    {
      method: 'GET',
      path: '/v1/services',
      access: 'agent-or-operator',
      handler: async () => {
        const services = await registry.listServices();
        const out = await Promise.all(services.map(async (s) => ({ ...s, instances: await registry.instances(s.name) })));
        return { json: out };
      },
    },
  ];
}

