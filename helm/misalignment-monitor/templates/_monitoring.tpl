{{/* Scrape endpoints shared by the ServiceMonitor and the PodMonitor. The monitor's job is named
misalignment-monitor (MisalignmentMonitorSidecarDown selects it); vLLM's keeps its pod label so
MisalignmentMonitorBlind can join the two on namespace, pod and model_name. */}}
{{- define "mm.endpoints" -}}
{{- $cfg := index . 0 }}
{{- $portKey := index . 1 }}
- {{ $portKey }}: monitor-metrics
  path: /metrics
  interval: {{ $cfg.interval }}
  scrapeTimeout: {{ $cfg.scrapeTimeout }}
  relabelings:
    - targetLabel: job
      replacement: misalignment-monitor
    {{- with $cfg.relabelings }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $cfg.metricRelabelings }}
  metricRelabelings:
    {{- toYaml . | nindent 4 }}
  {{- end }}
- {{ $portKey }}: http
  path: /metrics
  interval: {{ $cfg.interval }}
  scrapeTimeout: {{ $cfg.scrapeTimeout }}
  relabelings:
    - targetLabel: job
      replacement: vllm
    {{- with $cfg.relabelings }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $cfg.metricRelabelings }}
  metricRelabelings:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
