#!/usr/bin/env node
/**
 * What OHIF v3 makes of a DICOM SR: runs the released SR extension
 * (@ohif/extension-cornerstone-dicom-sr, the UMD bundle OHIF ships) in Node against the SR
 * and the CT instances it references, with OHIF's services stubbed, and prints ONE JSON
 * object on stdout.
 *
 *   node load_sr.mjs SR_FILE CT_DIR
 *
 * CT_DIR is searched recursively; only the headers of its files are read.  The files are
 * parsed with dcmjs and naturalized as OHIF does, held in OHIF's real DicomMetadataStore and
 * served to cornerstone by OHIF's real MetadataProvider (imageIds are wadors: URLs, as from
 * OHIF's DICOMweb data source).  The CT series become stack display sets like those of
 * @ohif/extension-default; the SR display set comes from the extension's own SOP class
 * handler, and its load() is what OHIF calls when the SR is opened in a viewport.
 * Where load() succeeds and OHIF would offer to track the SR (isRehydratable), the
 * extension's hydrateStructuredReport command is run too, with a measurement service that
 * records what would be added.
 *
 * The output's "measurements" are OHIF's own measurement objects, summarized; "textLines" is
 * what the SR viewport draws in each measurement's text box (the DICOMSRDisplay tool's own
 * _getTextBoxLinesFromLabels).  Everything OHIF wrote to the console is captured: warnings in
 * "skipped_messages", the rest in "console".  The exit status is 0 whenever a JSON object was
 * printed (also when load() fails: "loaded" is false and "error" says why); 2 for a usage
 * error or an unreadable SR file, 1 for a harness error.
 */

import fs from 'node:fs';
import path from 'node:path';
import util from 'node:util';
import vm from 'node:vm';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);

const WADO_ROOT = 'https://pacs.invalid/dicom-web'; // never contacted: imageIds only
const MAX_MESSAGES = 200;
const MAX_MESSAGE_CHARS = 600;
const MAX_ARG_CHARS = 160;
// The measurement mappings that @ohif/extension-cornerstone 3.13.13 registers for its
// "Cornerstone3DTools" 0.1 source (initMeasurementService); isRehydratable and hydration
// look an SR's measurements up among these annotation types.
const CORNERSTONE_SOURCE = { name: 'Cornerstone3DTools', version: '0.1' };
const MAPPED_ANNOTATION_TYPES = [
  'Length', 'Crosshairs', 'Bidirectional', 'EllipticalROI', 'CircleROI', 'ArrowAnnotate',
  'CobbAngle', 'Angle', 'RectangleROI', 'PlanarFreehandROI', 'SplineROI', 'CalibrationLine',
  'LivewireContour', 'Probe', 'UltrasoundDirectionalTool', 'UltrasoundPleuraBLineTool',
  'SegmentBidirectional',
];

class UsageError extends Error {}

// ------------------------------------------------------------------ console capture

const captured = { warn: [], other: [] };

function formatArgs(args) {
  // Each argument abridged on its own, so that an error after a large object still shows.
  const clip = (text, n) => (text.length > n ? `${text.slice(0, n)}...` : text);
  return args
    .map(a => {
      if (typeof a === 'string') return clip(a, MAX_MESSAGE_CHARS);
      if (a instanceof Error) return `${a.name}: ${a.message}`;
      const options = { depth: 2, breakLength: Infinity, maxArrayLength: 8, maxStringLength: 80 };
      return clip(util.inspect(a, options), MAX_ARG_CHARS);
    })
    .join(' ');
}

function captureConsole() {
  const keep = (list, level) => (...args) => {
    if (list.length < MAX_MESSAGES) {
      list.push(level === 'warn' ? formatArgs(args) : `${level}: ${formatArgs(args)}`);
    }
  };
  console.warn = keep(captured.warn, 'warn');
  for (const level of ['log', 'info', 'debug', 'error', 'trace']) {
    console[level] = keep(captured.other, level);
  }
}

// ------------------------------------------------------------------ DICOM files

function readDataset(dcmjs, file, headerOnly) {
  const buf = fs.readFileSync(file);
  const arrayBuffer = buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength);
  const options = headerOnly
    ? { ignoreErrors: false, untilTag: '7FE00010', includeUntilTagValue: false }
    : undefined;
  const message = dcmjs.data.DicomMessage.readFile(arrayBuffer, options);
  // As OHIF's data sources hold instances: naturalized (single-item sequences get dcmjs's
  // accessors, so both seq.CodeValue and seq[0].CodeValue work).
  const dataset = dcmjs.data.DicomMetaDictionary.naturalizeDataset(message.dict);
  dataset._meta = dcmjs.data.DicomMetaDictionary.namifyDataset(message.meta);
  return dataset;
}

function listFiles(dir) {
  // Symbolic links are followed (a test archive may link the CT files in).
  const out = [];
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, entry.name);
    const kind = entry.isSymbolicLink() ? fs.statSync(p) : entry;
    if (kind.isDirectory()) out.push(...listFiles(p));
    else if (kind.isFile()) out.push(p);
  }
  return out.sort();
}

function imageIdOf(instance, frame = 1) {
  const { StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID } = instance;
  const series = `${WADO_ROOT}/studies/${StudyInstanceUID}/series/${SeriesInstanceUID}`;
  return `wadors:${series}/instances/${SOPInstanceUID}/frames/${frame}`;
}

// ------------------------------------------------------------------ OHIF stand-ins

function browserGlobals() {
  // @ohif/core's bundle touches these when it loads (Mousetrap, atob) and its services
  // broadcast on document.body; cornerstone's addAnnotation tests `instanceof HTMLDivElement`.
  // Nothing is rendered.
  const noop = () => {};
  const element = () => ({
    style: {}, setAttribute: noop, appendChild: noop, addEventListener: noop, dispatchEvent: noop,
  });
  globalThis.HTMLElement ??= class HTMLElement {};
  globalThis.HTMLDivElement ??= class HTMLDivElement extends globalThis.HTMLElement {};
  globalThis.window ??= globalThis;
  globalThis.self ??= globalThis;
  globalThis.navigator ??= { userAgent: 'node', platform: 'linux', language: 'en-US' };
  globalThis.document ??= {
    addEventListener: noop,
    removeEventListener: noop,
    createElement: element,
    head: element(),
    body: element(),
    documentElement: element(),
  };
}

function loadExtension(ohif) {
  // The extension's own dist bundle, with stand-ins for the UI packages it imports only for
  // its viewport component (not used here) and for the source constants of
  // @ohif/extension-cornerstone.
  const stubs = {
    '@ohif/extension-cornerstone': {
      Enums: {
        CORNERSTONE_3D_TOOLS_SOURCE_NAME: CORNERSTONE_SOURCE.name,
        CORNERSTONE_3D_TOOLS_SOURCE_VERSION: CORNERSTONE_SOURCE.version,
      },
      usePositionPresentationStore: () => ({ setPositionPresentation: () => {} }),
      OHIFCornerstoneViewport: () => null,
    },
    '@ohif/i18n': { t: key => key },
    '@ohif/ui-next': { useViewportGrid: () => [{}, {}] },
    '@ohif/core/src/contextProviders/SystemProvider': { useSystem: ohif.useSystem },
  };
  const file = require.resolve('@ohif/extension-cornerstone-dicom-sr');
  const source = fs.readFileSync(file, 'utf8');
  const wrapper = vm.runInThisContext(
    `(function (exports, require, module, __filename, __dirname) {${source}\n})`,
    { filename: file }
  );
  const module = { exports: {} };
  const scopedRequire = id => (id in stubs ? stubs[id] : require(id));
  wrapper(module.exports, scopedRequire, module, file, path.dirname(file));
  return module.exports.default;
}

function makeStackDisplaySet(ohif, instances) {
  // What @ohif/extension-default's stack SOP class handler makes of a CT series (the
  // attributes the SR extension and OHIF's sorting read).
  const byNumber = (a, b) => (a.InstanceNumber ?? 0) - (b.InstanceNumber ?? 0);
  const images = [...instances].sort(byNumber);
  const first = images[0];
  const imageSet = new ohif.classes.ImageSet(images);
  imageSet.setAttributes({
    displaySetInstanceUID: imageSet.uid,
    SeriesDate: first.SeriesDate,
    SeriesTime: first.SeriesTime,
    SeriesInstanceUID: first.SeriesInstanceUID,
    StudyInstanceUID: first.StudyInstanceUID,
    SeriesNumber: first.SeriesNumber || 0,
    SOPClassUID: first.SOPClassUID,
    SeriesDescription: first.SeriesDescription || '',
    Modality: first.Modality,
    isMultiFrame: first.NumberOfFrames > 1,
    numImageFrames: images.length,
    SOPClassHandlerId: '@ohif/extension-default.sopClassHandlerModule.stack',
    isReconstructable: images.length > 1,
    FrameOfReferenceUID: first.FrameOfReferenceUID,
    instances: images,
  });
  return imageSet;
}

function makeServices() {
  const displaySets = new Map();
  const recorded = { rawMeasurements: [] };

  const dataSource = {
    // As OHIF's DICOMweb data source: one imageId per frame of each image of the display set.
    getImageIdsForDisplaySet(displaySet) {
      const ids = [];
      for (const instance of displaySet.images ?? []) {
        const frames = Number(instance.NumberOfFrames) || 1;
        if (frames > 1) for (let f = 1; f <= frames; f++) ids.push(imageIdOf(instance, f));
        else ids.push(instance.imageId);
      }
      return ids;
    },
    retrieve: {
      bulkDataURI: async ({ BulkDataURI }) => {
        throw new Error(`bulk data is not available in this harness: ${BulkDataURI}`);
      },
    },
  };

  const displaySetService = {
    EVENTS: {
      DISPLAY_SETS_ADDED: 'event::displaySetService:displaySetsAdded',
      DISPLAY_SETS_REMOVED: 'event::displaySetService:displaySetsRemoved',
    },
    get activeDisplaySets() {
      return [...displaySets.values()];
    },
    addDisplaySets(...sets) {
      for (const ds of sets.flat()) displaySets.set(ds.displaySetInstanceUID, ds);
      return sets;
    },
    getDisplaySetByUID: uid => displaySets.get(uid),
    getDisplaySetsBy: predicate => [...displaySets.values()].filter(predicate),
    getDisplaySetCache: () => displaySets,
    // No display set is added after the SR's, so no subscriber is ever called.
    subscribe: () => ({ unsubscribe: () => {} }),
  };

  const mappings = MAPPED_ANNOTATION_TYPES.map(annotationType => ({
    annotationType,
    // The real mappings turn the annotation into OHIF's measurement schema (panel label,
    // displayText); here the annotation itself is kept.
    toMeasurementSchema: data => data,
  }));
  let measurementCount = 0;
  const measurementService = {
    getSourceMappings: (name, version) =>
      name === CORNERSTONE_SOURCE.name && version === CORNERSTONE_SOURCE.version ? mappings : [],
    getSource: (name, version) => ({ name, version }),
    addRawMeasurement(source, annotationType, data) {
      const uid = `measurement-${++measurementCount}`;
      recorded.rawMeasurements.push({ uid, annotationType, data });
      return uid;
    },
  };

  const customizationService = {
    getCustomization(name) {
      // OHIF's defaults for the customizations the SR extension reads.
      if (name === 'codingValues') return {};
      if (name === 'panelMeasurement.disableEditing') return false;
      return undefined;
    },
  };

  const servicesManager = {
    services: { displaySetService, measurementService, customizationService },
  };
  const extensionManager = {
    getDataSources: () => [dataSource],
    getActiveDataSource: () => [dataSource],
  };
  const commandsManager = { runCommand: () => {} }; // hydration's "updateMeasurement"
  return { servicesManager, extensionManager, commandsManager, displaySetService, recorded };
}

// ------------------------------------------------------------------ report

function scoordOf(coord) {
  if (!coord) return null;
  const data = coord.GraphicData;
  const values = data == null ? [] : Array.isArray(data) ? data : [data];
  return {
    valueType: coord.ValueType ?? null,
    graphicType: coord.GraphicType ?? null,
    points: values.length / (coord.ValueType === 'SCOORD3D' ? 3 : 2),
    referencedSOPInstanceUID: coord.ReferencedSOPSequence?.ReferencedSOPInstanceUID ?? null,
    referencedFrameOfReferenceUID: coord.ReferencedFrameOfReferenceSequence ?? null,
  };
}

function summarize(measurement, { textLines, ctDisplaySetUIDs }) {
  const coords = measurement.coords ?? [];
  return {
    trackingUID: measurement.TrackingUniqueIdentifier ?? null,
    trackingIdentifier: measurement.TrackingIdentifier ?? null,
    // OHIF's annotation label (data.label = labels[0].value) and the text box lines
    label: measurement.labels?.[0]?.value ?? null,
    textLines: textLines(measurement.labels ?? []),
    labels: measurement.labels ?? [],
    graphicType: measurement.graphicType ?? coords[0]?.GraphicType ?? null,
    graphicCode: measurement.graphicCode ?? null,
    hasCoordinates: coords.length > 0,
    coords: coords.map(scoordOf),
    referencedSOPInstanceUID:
      measurement.ReferencedSOPInstanceUID ??
      coords[0]?.ReferencedSOPSequence?.ReferencedSOPInstanceUID ??
      null,
    // OHIF's "loaded": an annotation was made for it on an image of a display set
    loaded: measurement.loaded === true,
    displaySetInstanceUID: measurement.displaySetInstanceUID ?? null,
    matchedCTDisplaySet: ctDisplaySetUIDs.has(measurement.displaySetInstanceUID),
    imageId: measurement.imageId ?? null,
  };
}

function annotationSummary(a) {
  return {
    annotationUID: a.annotationUID,
    toolName: a.metadata?.toolName ?? null,
    label: a.data?.label ?? null,
    trackingUID: a.data?.TrackingUniqueIdentifier ?? null,
    referencedImageId: a.metadata?.referencedImageId ?? null,
    points: a.data?.handles?.points?.length ?? 0,
  };
}

function errorText(e) {
  if (!e) return null;
  const where = (e.stack ?? '').split('\n').slice(1, 3).map(s => s.trim()).join(' | ');
  return `${e.name ?? 'Error'}: ${e.message ?? String(e)}${where ? ` (${where})` : ''}`;
}

// ------------------------------------------------------------------ main

async function main(argv) {
  if (argv.length !== 2) throw new UsageError('usage: node load_sr.mjs SR_FILE CT_DIR');
  const [srFile, ctDir] = argv;
  if (!fs.existsSync(srFile)) throw new UsageError(`no such SR file: ${srFile}`);
  if (!fs.existsSync(ctDir) || !fs.statSync(ctDir).isDirectory()) {
    throw new UsageError(`no such CT directory: ${ctDir}`);
  }

  captureConsole();
  const csCore = await import('@cornerstonejs/core');
  const csTools = await import('@cornerstonejs/tools');
  const dcmjs = (await import('dcmjs')).default;
  browserGlobals();
  const ohif = require('@ohif/core');
  const ext = loadExtension(ohif);

  let sr;
  try {
    sr = readDataset(dcmjs, srFile, false);
  } catch (e) {
    throw new UsageError(`cannot read SR file ${srFile}: ${e.message}`);
  }

  // The image instances (CT), by series.  Other objects (the SR itself, a SEG) are left out:
  // OHIF gives them display sets of their own, which hold no images to match coordinates to.
  const series = new Map();
  const ignoredFiles = [];
  for (const file of listFiles(ctDir)) {
    let ds;
    try {
      ds = readDataset(dcmjs, file, true);
    } catch (e) {
      ignoredFiles.push(`${path.relative(ctDir, file)}: ${e.message}`);
      continue;
    }
    if (ds.SOPInstanceUID === sr.SOPInstanceUID) continue;
    if (!ds.Rows || ds.SegmentSequence) {
      const what = ds.Modality ?? ds.SOPClassUID;
      ignoredFiles.push(`${path.relative(ctDir, file)}: not an image (${what})`);
      continue;
    }
    if (!series.has(ds.SeriesInstanceUID)) series.set(ds.SeriesInstanceUID, []);
    series.get(ds.SeriesInstanceUID).push(ds);
  }

  const { MetadataProvider } = ohif.classes;
  csCore.metaData.addProvider((type, ...query) => MetadataProvider.get(type, ...query), 9999);
  const addToStore = instances => {
    for (const instance of instances) {
      instance.wadoRoot = WADO_ROOT;
      instance.imageId = imageIdOf(instance);
      const { StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID } = instance;
      MetadataProvider.addImageIdToUIDs(instance.imageId, {
        StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID,
      });
    }
    ohif.DicomMetadataStore.addInstances(instances, false);
  };

  const { servicesManager, extensionManager, commandsManager, displaySetService, recorded } =
    makeServices();

  const ctDisplaySets = [];
  for (const instances of series.values()) {
    addToStore(instances);
    ctDisplaySets.push(makeStackDisplaySet(ohif, instances));
  }
  displaySetService.addDisplaySets(...ctDisplaySets);
  addToStore([sr]);

  // As OHIF's extension manager does at registration: the SR tools (DICOMSRDisplay, ...).
  ext.preRegistration({ servicesManager, configuration: {} });
  const DICOMSRDisplay = csTools.state.tools?.DICOMSRDisplay?.toolClass;
  const textLines = labels =>
    DICOMSRDisplay ? DICOMSRDisplay.prototype._getTextBoxLinesFromLabels.call(null, labels) : null;

  const handlers = ext.getSopClassHandlerModule({ servicesManager, extensionManager });
  const handler = handlers.find(h => h.sopClassUids.includes(sr.SOPClassUID));
  const result = {
    loaded: false,
    error: null,
    sopClassHandler: handler ? `${ext.id}.sopClassHandlerModule.${handler.name}` : null,
    isImagingMeasurementReport: null,
    isRehydratable: null,
    ctDisplaySets: ctDisplaySets.map(ds => ({
      displaySetInstanceUID: ds.displaySetInstanceUID,
      SeriesInstanceUID: ds.SeriesInstanceUID,
      images: ds.images.length,
    })),
    referencedImages: [],
    measurements: [],
    annotations: [],
    hydration: null,
    skipped_messages: [],
    console: [],
    ignored_files: ignoredFiles,
  };
  if (!handler) {
    result.error = `no SOP class handler of the SR extension takes SOP class ${sr.SOPClassUID}`;
    return finish(result);
  }

  const [srDisplaySet] = handler.getDisplaySetsFromSeries([sr]);
  displaySetService.addDisplaySets(srDisplaySet);
  result.isImagingMeasurementReport = srDisplaySet.isImagingMeasurementReport;
  try {
    await srDisplaySet.load();
    result.loaded = true;
  } catch (e) {
    result.error = errorText(e);
  }
  result.isRehydratable = srDisplaySet.isRehydratable ?? null;
  result.referencedImages = (srDisplaySet.referencedImages ?? []).map(
    r => r.ReferencedSOPInstanceUID
  );
  const ctDisplaySetUIDs = new Set(ctDisplaySets.map(ds => ds.displaySetInstanceUID));
  result.measurements = (srDisplaySet.measurements ?? []).map(m =>
    summarize(m, { textLines, ctDisplaySetUIDs })
  );
  result.annotations = csTools.annotation.state.getAllAnnotations().map(annotationSummary);

  // "Track" in OHIF's prompt: hydrate the SR into the measurement service.
  if (result.loaded && srDisplaySet.isRehydratable) {
    const commands = ext.getCommandsModule({ servicesManager, extensionManager, commandsManager });
    result.hydration = { error: null, added: [] };
    try {
      const { displaySetInstanceUID } = srDisplaySet;
      commands.actions.hydrateStructuredReport({ displaySetInstanceUID });
    } catch (e) {
      result.hydration.error = errorText(e);
    }
    result.hydration.added = recorded.rawMeasurements.map(({ annotationType, data }) => ({
      annotationType,
      label: data.annotation?.data?.label ?? null,
      annotationUID: data.annotation?.annotationUID ?? null,
      referencedImageId: data.annotation?.metadata?.referencedImageId ?? null,
    }));
  }
  return finish(result);
}

function finish(result) {
  result.skipped_messages = captured.warn;
  result.console = captured.other;
  return result;
}

main(process.argv.slice(2)).then(
  result => {
    process.stdout.write(`${JSON.stringify(result, null, 1)}\n`);
  },
  e => {
    process.stderr.write(`load_sr.mjs: ${e instanceof UsageError ? e.message : e?.stack ?? e}\n`);
    process.exitCode = e instanceof UsageError ? 2 : 1;
  }
);
