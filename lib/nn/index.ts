export { Embedding, Linear, LoraWeight, RMSNorm, type InitOptions } from './layers.js';
export { Module, ModuleList, owned } from './module.js';
