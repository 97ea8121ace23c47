// The parts of the seed app that its handlers use (toast, the character record, the prompt
// builder, the gallery's state), as small stubs that record every call and show it on the page.
import type { ViewType } from "@charai/client/seed";

export interface Character {
  id: string;
  name: string;
  basePrompt: string;
}

export interface CharacterView {
  url: string;
  prompt: string;
  generatedAt: string;
}

export interface CharacterVoice {
  url: string;
  text: string;
  generatedAt: string;
}

/** What the handlers did, for the test to read. */
export const calls = {
  toast: [] as { kind: "info" | "success" | "error"; text: string }[],
  updateCharacterView: [] as { characterId: string; viewType: ViewType; view: CharacterView }[],
  updateCharacterVoice: [] as { characterId: string; voice: CharacterVoice }[],
};

/** The character the gallery shows (a prop of the seed's component). */
export const character: Character = { id: "char_001", name: "李明", basePrompt: "" };

/** The gallery's resolution picker: nothing chosen, so the default applies. */
export const selectedResolution: string | undefined = undefined;

export function getDefaultResolution(): string {
  return "1024x1024";
}

const VIEW_LABELS: Record<string, string> = { front: "正面", side: "侧面", back: "背面" };

export function getViewTypeLabel(viewType: ViewType): string {
  return VIEW_LABELS[viewType] ?? viewType;
}

export const aiApi = {
  buildCharacterPrompt(basePrompt: string, viewType: ViewType): string {
    return `${basePrompt}, ${viewType} view, full body`;
  },
};

function log(kind: string, text: string): void {
  const item = document.createElement("li");
  item.className = `log-${kind}`;
  item.textContent = `${kind}: ${text}`;
  document.getElementById("log")?.append(item);
}

function toastOf(kind: "info" | "success" | "error"): (text: string) => void {
  return (text) => {
    calls.toast.push({ kind, text });
    log(`toast.${kind}`, text);
  };
}

export const toast = { info: toastOf("info"), success: toastOf("success"), error: toastOf("error") };

/** The seed's store action: saves the view's image URL in the character record. */
export function updateCharacterView(characterId: string, viewType: ViewType, view: CharacterView): void {
  calls.updateCharacterView.push({ characterId, viewType, view });
  log("updateCharacterView", `${characterId} ${viewType} ${view.url}`);
}

/** The voice counterpart of updateCharacterView. */
export function updateCharacterVoice(characterId: string, voice: CharacterVoice): void {
  calls.updateCharacterVoice.push({ characterId, voice });
  log("updateCharacterVoice", `${characterId} ${voice.url}`);
}
