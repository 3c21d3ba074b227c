export { AdamW, clipGradNorm, type AdamWOptions, type AdamWState } from './adamw.js';
