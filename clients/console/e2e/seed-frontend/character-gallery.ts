// The seed's component code, transcribed from seed/character-ai-task-queue-design.md
// ("Component Integration", character-gallery.tsx 改造后). handleGenerateImage is the seed's,
// character for character; handleGenerateVoice is its TTS counterpart written the same way (the
// document shows only the image one). The one change: characterTasksApi, taskStore and the
// result types are imported from @charai/client/seed instead of the seed's own modules.
import {
  characterTasksApi,
  taskStore,
  type ImageGenerationResult,
  type TTSGenerationResult,
  type ViewType,
} from '@charai/client/seed'
import {
  aiApi,
  character,
  getDefaultResolution,
  getViewTypeLabel,
  selectedResolution,
  toast,
  updateCharacterView,
  updateCharacterVoice,
} from './app'

// prettier-ignore
export const handleGenerateImage = async (viewType: ViewType) => {
  if (!character.basePrompt) {
    toast.error('请先设置角色的基础提示词')
    return
  }

  const prompt = aiApi.buildCharacterPrompt(character.basePrompt, viewType)
  const resolution = selectedResolution || getDefaultResolution()

  try {
    // 提交任务（异步）
    const task = await characterTasksApi.submitImageTask({
      characterId: character.id,
      viewType,
      prompt,
      resolution,
    })

    toast.info(`图片生成任务已提交 (${task.id})`)

    // 监听任务完成
    taskStore.subscribeToTask(task.id, (updatedTask) => {
      if (updatedTask.status === 'completed') {
        const result = updatedTask.result as ImageGenerationResult
        updateCharacterView(character.id, viewType, {
          url: result.imageUrl,
          prompt: result.prompt,
          generatedAt: result.generatedAt,
        })
        toast.success(`${getViewTypeLabel(viewType)}图片已生成`)
      } else if (updatedTask.status === 'failed') {
        toast.error(`图片生成失败: ${updatedTask.error}`)
      }
    })
  } catch (error) {
    toast.error('提交任务失败')
  }
}

// prettier-ignore
export const handleGenerateVoice = async (text: string, voiceStyle: string) => {
  if (!text.trim()) {
    toast.error('请先输入台词')
    return
  }

  try {
    // 提交任务（异步）
    const task = await characterTasksApi.submitTTSTask({
      characterId: character.id,
      text,
      voiceStyle,
      options: { responseFormat: 'mp3' },
    })

    toast.info(`语音生成任务已提交 (${task.id})`)

    // 监听任务完成
    taskStore.subscribeToTask(task.id, (updatedTask) => {
      if (updatedTask.status === 'completed') {
        const result = updatedTask.result as TTSGenerationResult
        updateCharacterVoice(character.id, {
          url: result.audioUrl,
          text: result.text,
          generatedAt: result.generatedAt,
        })
        toast.success('语音已生成')
      } else if (updatedTask.status === 'failed') {
        toast.error(`语音生成失败: ${updatedTask.error}`)
      }
    })
  } catch (error) {
    toast.error('提交任务失败')
  }
}
