/**
 * The virtual-IP table of transparent mode, owned by the control plane:
 * one signed document in the registry (`vips`) mapping every service that
 * has ever been given a certificate to its address. The control plane
 * assigns an address the first time it signs a leaf for a service (every
 * service that carries mesh traffic gets one, on every host at once) and
 * never reassigns it, so a DNS answer a client cached keeps naming the
 * same service. Agents verify the document like intentions and answer
 * `<service>.knit` from it; nobody else can write it.
 */
import { KnitError } from '../errors.js';
import type { SignedKv } from '../registry/signed-kv.js';
import { assignVips, parseRange, type VipRange } from '../proxy/transparent/vips.js';

/** The registry key and the `kind` the table is signed as. */
export const VIPS_KEY = 'vips';
export const VIPS_KIND = 'vips';

/** The signed body: the range addresses come from and service -> address. */
export interface VipDocument {
  range: string;
  services: Record<string, string>;
}

/** Reads a verified body; throws KNIT_ERR_SIGNATURE when its shape is wrong. */
export function decodeVips(body: unknown): VipDocument {
  const b = body as Partial<VipDocument> | undefined;
  if (!b || typeof b.range !== 'string' || typeof b.services !== 'object' || b.services === null) {
    throw new KnitError('KNIT_ERR_SIGNATURE', 'vips: the document has no range or services');
  }
  for (const [k, v] of Object.entries(b.services)) {
    if (typeof v !== 'string') throw new KnitError('KNIT_ERR_SIGNATURE', `vips: ${k} has no address`);
  }
  return { range: b.range, services: { ...b.services } };
}

/** Assigns addresses on first use; remembers what it wrote so a renewal costs no registry read. */
export class VipStore {
  private readonly range: VipRange;
  private readonly known = new Set<string>();

  constructor(
    private readonly kv: SignedKv,
    range: string,
  ) {
    this.range = parseRange(range);
  }

  /** The range addresses are assigned from. */
  get cidr(): string {
    return this.range.cidr;
  }

  /** Makes sure `service` has an address (a compare-and-set write when it has none). */
  async ensure(service: string): Promise<void> {
    if (this.known.has(service)) return;
    const out = await this.kv.update<VipDocument>(VIPS_KEY, VIPS_KIND, (cur) => {
      const doc = cur ? decodeVips(cur) : { range: this.range.cidr, services: {} };
      if (doc.services[service]) return undefined;
      // Addresses stay where they are even if the configured range changed: a cached answer keeps its meaning.
      const next = assignVips(new Map(Object.entries(doc.services)), [service], this.range);
      return { range: this.range.cidr, services: Object.fromEntries(next) };
    });
    if (out && decodeVips(out).services[service]) this.known.add(service);
  }
}
