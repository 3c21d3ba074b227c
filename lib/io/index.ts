export { openCheckpoint, SafetensorsCheckpoint, SafetensorsFile, writeSafetensors, writeShardedSafetensors } from './safetensors.js';
export { SafetensorsError, SAFETENSORS_DTYPES, type SafetensorsDType, type SafetensorsTensorInfo } from './safetensors-format.js';
