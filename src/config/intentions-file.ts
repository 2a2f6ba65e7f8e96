/**
 * Intention files, kept in git by the team and applied with
 * `knit intention apply -f FILE`:
 *
 *     default: deny
 *     intentions:
 *       - { source: web, destination: api, action: allow }
 *
 * Every problem is reported with file, line and field; a file with any
 * problem applies nothing.
 */
import { readFile } from 'node:fs/promises';
import { ConfigError, type FileProblem } from '../errors.js';
import { ajv, parseLocated, fieldPath, schemaProblems } from './document.js';
import { validateSide, type Action, type Intention, type IntentionSet } from '../policy/intentions.js';

const schema = {
  type: 'object',
  additionalProperties: false,
  required: ['intentions'],
  properties: {
    default: { enum: ['allow', 'deny'] },
    intentions: {
      type: 'array',
      items: {
        type: 'object',
        additionalProperties: false,
        required: ['source', 'destination', 'action'],
        properties: {
          source: { type: 'string' },
          destination: { type: 'string' },
          action: { enum: ['allow', 'deny'] },
          description: { type: 'string' },
        },
      },
    },
  },
} as const;

const validate = ajv.compile(schema);

/** A parsed intentions file; `defaultAction` is absent when the file does not set it. */
export interface IntentionsFile {
  defaultAction?: Action;
  intentions: Intention[];
}

/**
 * Parses an intentions file; throws ConfigError with every problem. A wrong
 * type in one entry does not hide the problems of the others.
 */
export function parseIntentionsFile(file: string, text: string): IntentionsFile {
  const { doc, problems } = parseLocated(file, text);
  if (!doc) throw new ConfigError(problems);
  const out: FileProblem[] = schemaProblems(doc, validate);
  const value = (typeof doc.value === 'object' && doc.value !== null ? doc.value : {}) as { default?: Action; intentions?: unknown };
  const list = Array.isArray(value.intentions) ? (value.intentions as unknown[]) : [];
  const seen = new Map<string, number>();
  list.forEach((raw, n) => {
    if (typeof raw !== 'object' || raw === null) return;
    const i = raw as Partial<Record<'source' | 'destination', unknown>>;
    for (const side of ['source', 'destination'] as const) {
      const v = i[side];
      if (typeof v !== 'string') continue;
      try {
        validateSide(v, side);
      } catch (e) {
        out.push({ file, line: doc.lineOf(['intentions', n, side]), field: fieldPath(['intentions', n, side]), message: (e as Error).message });
      }
    }
    if (typeof i.source !== 'string' || typeof i.destination !== 'string') return;
    const k = `${i.source}\u0000${i.destination}`;
    const first = seen.get(k);
    if (first !== undefined) {
      out.push({ file, line: doc.lineOf(['intentions', n]), field: fieldPath(['intentions', n]), message: `duplicate intention ${i.source} -> ${i.destination} (first at intentions[${first}])` });
    } else seen.set(k, n);
  });
  if (out.length) throw new ConfigError(out);
  return { defaultAction: value.default, intentions: (list as Intention[]).map((i) => ({ ...i })) };
}

/** Reads and parses an intentions file from disk. */
export async function readIntentionsFile(path: string): Promise<IntentionsFile> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    throw new ConfigError([{ file: path, message: `cannot read: ${(e as Error).message}` }]);
  }
  return parseIntentionsFile(path, text);
}

/** The set that results from applying a file over the current one: the file replaces all intentions. */
export function applyFile(current: IntentionSet, file: IntentionsFile): IntentionSet {
  return { defaultAction: file.defaultAction ?? current.defaultAction, intentions: file.intentions };
}
