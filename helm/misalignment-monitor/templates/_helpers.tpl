{{- define "mm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mm.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* A component's own name label, so the vLLM Deployment's and Service's selectors never pick its pods. */}}
{{- define "mm.componentSelectorLabels" -}}
{{- $top := index . 0 }}{{ $component := index . 1 -}}
app.kubernetes.io/name: {{ include "mm.name" $top }}-{{ $component }}
app.kubernetes.io/instance: {{ $top.Release.Name }}
app.kubernetes.io/component: {{ $component }}
{{- end }}

{{- define "mm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "mm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "mm.monitorImage" -}}
{{ .Values.monitor.image.repository }}:{{ .Values.monitor.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The monitor config the sidecar and the plugin read: values.monitor.config plus what the chart owns. */}}
{{- define "mm.monitorConfig" -}}
{{- $c := deepCopy .Values.monitor.config }}
{{- $_ := set $c "model" (merge (dict "name" .Values.vllm.servedModelName) (deepCopy ($c.model | default dict))) }}
{{- $_ = set $c "transport" (merge (dict "directory" "/dev/shm" "name" "misalignment-monitor" "file_mode" "0660") (deepCopy ($c.transport | default dict))) }}
{{- $_ = set $c "detectors" (list "/etc/misalignment-monitor/detectors") }}
{{- if .Values.monitor.revealPublicKey }}
{{- $_ = set $c "evidence" (merge (dict "reveal_public_key_file" "/etc/misalignment-monitor/config/reveal.pub") (deepCopy ($c.evidence | default dict))) }}
{{- end }}
{{- $kafka := dict "enabled" .Values.kafka.enabled }}
{{- if .Values.kafka.enabled }}
{{- $_ = set $kafka "bootstrap_servers" .Values.kafka.bootstrapServers }}
{{- $_ = set $kafka "topic" .Values.kafka.topic }}
{{- $_ = set $kafka "incident_topic" .Values.kafka.incidentTopic }}
{{- $_ = set $kafka "security_protocol" .Values.kafka.securityProtocol }}
{{- $_ = set $kafka "spool_dir" "/var/spool/misalignment-monitor" }}
{{- $_ = set $kafka "spool_max_bytes" (int64 .Values.kafka.spool.maxBytes) }}
{{- if hasPrefix "SASL" .Values.kafka.securityProtocol }}
{{- $_ = set $kafka "sasl_mechanism" .Values.kafka.sasl.mechanism }}
{{- $_ = set $kafka "sasl_username" .Values.kafka.sasl.username }}
{{- $_ = set $kafka "sasl_password_file" "/etc/misalignment-monitor/kafka-sasl/password" }}
{{- end }}
{{- if .Values.kafka.tls.existingSecret }}
{{- $_ = set $kafka "ssl_cafile" (printf "/etc/misalignment-monitor/kafka-tls/%s" .Values.kafka.tls.caKey) }}
{{- if .Values.kafka.tls.certKey }}
{{- $_ = set $kafka "ssl_certfile" (printf "/etc/misalignment-monitor/kafka-tls/%s" .Values.kafka.tls.certKey) }}
{{- $_ = set $kafka "ssl_keyfile" (printf "/etc/misalignment-monitor/kafka-tls/%s" .Values.kafka.tls.keyKey) }}
{{- end }}
{{- end }}
{{- end }}
{{- $_ = set $c "sinks" (dict "kafka" $kafka "prometheus" (dict "enabled" true "host" "$POD_IP" "port" (int .Values.monitor.port))) }}
{{- $_ = set $c "deployment" (dict "name" (include "mm.fullname" .) "namespace" .Release.Namespace) }}
{{- $_ = set $c "store" (dict "retention_days" .Values.store.retentionDays "metrics_host" "$POD_IP" "metrics_port" 9466) }}
{{- with .Values.console }}
{{- $console := dict "host" "0.0.0.0" "port" (int .port) }}
{{- if .tokens.existingSecret }}{{ $_ = set $console "tokens_file" "/etc/misalignment-monitor/console-tokens/tokens.yaml" }}{{ end }}
{{- if .baseUrl }}{{ $_ = set $console "base_url" .baseUrl }}{{ end }}
{{- if .grafanaUrl }}{{ $_ = set $console "grafana_url" .grafanaUrl }}{{ end }}
{{- if .sessionSecret.existingSecret }}{{ $_ = set $console "session_secret_file" "/etc/misalignment-monitor/console-session/secret" }}{{ end }}
{{- if .revealKey.existingSecret }}{{ $_ = set $console "reveal_key_file" "/etc/misalignment-monitor/console-reveal/key" }}{{ end }}
{{- if .proxy.enabled }}
{{- $_ = set $console "proxy" (dict "enabled" true "trusted_proxies" .proxy.trustedProxies "user_header" .proxy.userHeader "groups_header" .proxy.groupsHeader "roles" .proxy.roles "text_groups" .proxy.textGroups "default_role" .proxy.defaultRole) }}
{{- end }}
{{- $_ = set $c "console" $console }}
{{- end }}
{{- toYaml $c }}
{{- end }}

{{/* The monitor container: rendered as a native sidecar (initContainers, restartPolicy Always) or a regular container. */}}
{{- define "mm.monitorContainer" -}}
- name: monitor
  image: {{ include "mm.monitorImage" . }}
  imagePullPolicy: {{ .Values.monitor.image.pullPolicy }}
  {{- if .Values.monitor.nativeSidecar }}
  restartPolicy: Always
  {{- end }}
  args: ["sidecar", "--config", "/etc/misalignment-monitor/config/monitor.yaml"]
  ports:
    - name: monitor-metrics
      containerPort: {{ .Values.monitor.port }}
      protocol: TCP
  env:
    - name: POD_NAME
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    # /metrics binds the pod's address (sinks.prometheus.host: $POD_IP), not every interface.
    - name: POD_IP
      valueFrom:
        fieldRef:
          fieldPath: status.podIP
    # A read-only root filesystem: every cache goes to the /tmp emptyDir.
    - name: HOME
      value: /tmp
    - name: HF_HOME
      value: /tmp/huggingface
    - name: MPLCONFIGDIR
      value: /tmp/matplotlib
    {{- with .Values.monitor.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  securityContext:
    {{- toYaml .Values.monitor.securityContext | nindent 4 }}
  resources:
    {{- toYaml .Values.monitor.resources | nindent 4 }}
  livenessProbe:
    {{- toYaml .Values.monitor.livenessProbe | nindent 4 }}
  readinessProbe:
    {{- toYaml .Values.monitor.readinessProbe | nindent 4 }}
  volumeMounts:
    - name: dshm
      mountPath: /dev/shm
    - name: monitor-config
      mountPath: /etc/misalignment-monitor/config
      readOnly: true
    - name: monitor-detectors
      mountPath: /etc/misalignment-monitor/detectors
      readOnly: true
    - name: tmp
      mountPath: /tmp
    {{- if .Values.kafka.enabled }}
    - name: spool
      mountPath: /var/spool/misalignment-monitor
    {{- end }}
    {{- if and .Values.kafka.enabled (hasPrefix "SASL" .Values.kafka.securityProtocol) }}
    - name: kafka-sasl
      mountPath: /etc/misalignment-monitor/kafka-sasl
      readOnly: true
    {{- end }}
    {{- if and .Values.kafka.enabled .Values.kafka.tls.existingSecret }}
    - name: kafka-tls
      mountPath: /etc/misalignment-monitor/kafka-tls
      readOnly: true
    {{- end }}
    {{- if .Values.monitor.artifactsVolume }}
    - name: artifacts
      mountPath: /artifacts
      readOnly: true
    {{- end }}
{{- end }}

{{/* Volumes the monitor needs (the pod's, or added to another chart's pod by the integrations). */}}
{{- define "mm.monitorVolumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shm.sizeLimit }}
- name: monitor-config
  configMap:
    name: {{ include "mm.fullname" . }}-monitor
- name: monitor-detectors
  configMap:
    name: {{ include "mm.fullname" . }}-detectors
- name: tmp
  emptyDir: {}
{{- if .Values.kafka.enabled }}
- name: spool
  emptyDir:
    sizeLimit: {{ .Values.kafka.spool.sizeLimit }}
{{- end }}
{{- if and .Values.kafka.enabled (hasPrefix "SASL" .Values.kafka.securityProtocol) }}
- name: kafka-sasl
  secret:
    secretName: {{ required "kafka.sasl.existingSecret is required with SASL" .Values.kafka.sasl.existingSecret }}
    items:
      - key: {{ .Values.kafka.sasl.passwordKey }}
        path: password
{{- end }}
{{- if and .Values.kafka.enabled .Values.kafka.tls.existingSecret }}
- name: kafka-tls
  secret:
    secretName: {{ .Values.kafka.tls.existingSecret }}
{{- end }}
{{- with .Values.monitor.artifactsVolume }}
- name: artifacts
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The database URL, from the existing Secret, as the variable the store reads. */}}
{{- define "mm.storeEnv" -}}
- name: MONITOR_STORE_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "store.existingSecret is required for the ingester, the console and the migrations" .Values.store.existingSecret }}
      key: {{ .Values.store.urlKey }}
{{- end }}

{{/* A hardened container for the store's processes (ingester, console, migrations). */}}
{{- define "mm.storeContainer" -}}
image: {{ include "mm.monitorImage" . }}
imagePullPolicy: {{ .Values.monitor.image.pullPolicy }}
securityContext:
  {{- toYaml .Values.monitor.securityContext | nindent 2 }}
{{- end }}


{{/* Fail the render when one vLLM worker's ring would not fit in /dev/shm (the plugin reserves it whole). */}}
{{- define "mm.ringFits" -}}
{{- $t := .Values.monitor.config.transport | default dict }}
{{- $slots := int ($t.slots | default 64) }}
{{- $rows := int ($t.slot_rows | default 512) }}
{{- $d := int ((.Values.monitor.config.model | default dict).d_model | default 0) }}
{{- $layers := len (.Values.monitor.config.taps | default list) }}
{{- if and $d $layers }}
{{- $raw := add 64 65536 (mul $rows 4) (mul $layers $rows $d 2) }}
{{- $ring := add 4096 (mul $slots (mul (div (add $raw 4095) 4096) 4096)) }}
{{- $q := toString .Values.shm.sizeLimit }}
{{- $n := int64 (regexFind "^[0-9]+" $q) }}
{{- $unit := trimPrefix (toString $n) $q }}
{{- $mult := get (dict "" 1 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "K" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000) $unit }}
{{- if not $mult }}{{ fail (printf "shm.sizeLimit %q: use a plain quantity such as 2Gi or 512Mi" $q) }}{{ end }}
{{- $limit := mul $n $mult }}
{{- if gt (mul $ring 4) (mul $limit 3) }}
{{- fail (printf "one ring (%d slots x %d rows x %d tapped layer(s) at d_model %d) takes %d MiB, more than three quarters of shm.sizeLimit %s: raise shm.sizeLimit or lower monitor.config.transport.slots / slot_rows" $slots $rows $layers $d (div $ring 1048576) $q) }}
{{- end }}
{{- end }}
{{- end }}
